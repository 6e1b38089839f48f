"""Content feature view (``core.schema.CONTENT_VIEW``): hourly windowed counts per post.

Rows (point-in-time rule in ``pipelines.features.common``):
- hourly grid: for each post with impressions, one row per hour start H from the hour of its first
  impression through ``grid_end`` (the end of the log's last hour, i.e. its last hour + 1 h),
  stamped H. Window counts cover events in ``[H - W, H)`` for W = 1 h, 24 h, 7 d; totals cover all
  events before H. An event at exactly H:00 is therefore counted from the row stamped H + 1 h on,
  and leaves the 1 h window at the row stamped H + 2 h.
- base rows: one per post (posts table and log), stamped at ``created_ts`` (``base_ts`` if earlier
  or unknown), with static columns and zero counts, so a post never shown still has features.
  Kept only when earlier than the post's first grid row (which has zero counts as well).

Features:
- static: ``post_duration_ms`` (ms), ``post_created_ts`` (epoch seconds, floor),
  ``post_is_ad`` (1 if ``video_type == "AD"``).
- ``post_{impressions,clicks,long_views,likes}_{1h,24h,7d}``: impressions, and impressions with
  click / long_view / like = 1, in the window.
- ``post_click_rate_24h = (clicks_24h + p_click * 10) / (impressions_24h + 10)``, likewise
  ``post_long_view_rate_24h`` (p_long_view) and ``post_like_rate_7d`` (7 d window, p_like).
- ``post_impressions_total``: impressions before H; ``post_engagement_rate_total`` =
  ``(engaged_total + p_engaged * 10) / (impressions_total + 10)`` with engaged = any positive head.
- ``post_{head}_rate_total`` for every head of ``core.schema.HEADS`` (rare ones included):
  ``(positives_total + p_head * 10) / (impressions_total + 10)``, the post's smoothed prior rate of
  that head over all its impressions before H. Ranked alone, it is the popularity lookup that
  offline evaluation compares every ranker with (``models.evaluate``).
- ``author_impressions_total`` and ``author_{head}_rate_total`` for every head: the same totals and
  smoothing (``p_head``) over all impressions of all the post's author's posts before H (the author
  is ``posts.author_id``): the author's totals at H, as a dense (author, hour) grid joined by
  (author_id, H) would give them, so also at hours when this post had no impressions. A base
  row stamped t gets the author's totals at ``floor_hour(t)`` (events before that hour: point-in-time
  safe, up to 1 h stale; zero counts, i.e. the prior rate, if the author had no impression yet).
  Between a post's base row and its first grid row, and for never-shown posts after their base
  row, the author values stay those of the base row (the view has no other rows for the post).

Computation (O(rows), no sliding frames): per hour bucket B the counts of events in [B, B + 1 h);
running sums over the dense grid give ``before(H)`` = events < H; a window count is
``before(H) - before(H - W)`` (``lag`` by W rows; 0 before the first row). The author totals sum
the per-(post, hour) counts per (author, hour), stamps them at the bucket end and takes a running
sum per author over them and the author's posts' rows (no dense author grid is materialised).
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import CONTENT_VIEW, HEADS, WINDOWS_HOURS, post_prior_rate
from pipelines.features.common import (
    RatePriors,
    engaged_flag,
    epoch_seconds,
    smoothed_rate,
    ts_literal,
)

# Output kind -> head counted (None: every impression).
KINDS: dict[str, str | None] = {"impressions": None, "clicks": "click", "long_views": "long_view",
                                "likes": "like"}
# Per-head positive counts, summed over all time (the prior rate of every head).
_HEAD_COUNTS = tuple(f"pos_{h}" for h in HEADS)
_COUNTS = (*KINDS, "engaged", *_HEAD_COUNTS)
# Counts kept per (author, hour): impressions and per-head positives.
_AUTHOR_COUNTS = ("impressions", *_HEAD_COUNTS)


def hourly_counts(impressions: DataFrame) -> DataFrame:
    """Per (post_id, hour) counts of events in [hour, hour + 1 h): ``KINDS``, ``engaged``, ``pos_{head}``.

    Also ``author_id`` (the impressions' author of the post: one per post in canonical data).
    """
    return impressions.groupBy("post_id", F.date_trunc("hour", "event_ts").alias("hour")).agg(
        F.max("author_id").alias("author_id"),
        *(F.count(F.lit(1)).alias(k) if h is None else F.sum((F.col(h) > 0).cast("long")).alias(k)
          for k, h in KINDS.items()),
        F.sum(engaged_flag().cast("long")).alias("engaged"),
        *(F.sum((F.col(h) > 0).cast("long")).alias(f"pos_{h}") for h in HEADS),
    )


def grid_end_of(impressions: DataFrame) -> pd.Timestamp:
    """The end of the log's last hour: floor_hour(max event_ts) + 1 h (UTC).

    Raises:
        ValueError: no impressions.
    """
    last = impressions.agg(F.max("event_ts").alias("t")).first()["t"]
    if last is None:
        raise ValueError("cannot build content features from an empty impressions table")
    last = pd.Timestamp(last)
    last = last.tz_localize("UTC") if last.tzinfo is None else last.tz_convert("UTC")
    return last.floor("h") + pd.Timedelta(hours=1)


def post_static(posts: DataFrame) -> DataFrame:
    """Static columns per post: ``post_duration_ms``, ``post_created_ts``, ``post_is_ad``, ``created_ts``,
    ``posts_author`` (``author_id``)."""
    return posts.select(
        "post_id",
        "created_ts",
        F.col("author_id").alias("posts_author"),
        F.col("duration_ms").alias("post_duration_ms"),
        epoch_seconds(F.col("created_ts")).alias("post_created_ts"),
        F.coalesce((F.col("video_type") == "AD").cast("long"), F.lit(0)).alias("post_is_ad"),
    )


def hourly_grid(hourly: DataFrame, grid_end: pd.Timestamp) -> DataFrame:
    """Dense grid rows from ``hourly_counts(impressions)``: ``post_id``, ``log_author``, ``first_hour``, ``event_timestamp`` (= H) and window counts.

    ``log_author``: the post's ``author_id`` in the impressions.

    Besides the keys: ``{kind}_{w}`` for each of ``KINDS`` x ``WINDOWS_HOURS`` (events in
    [H - W, H)) and ``impressions_total`` / ``engaged_total`` / ``pos_{head}_total`` (events
    before H); LongType.
    """
    first = hourly.groupBy("post_id").agg(F.min("hour").alias("first_hour"),
                                          F.max("author_id").alias("log_author"))
    grid = first.select(
        "post_id", "log_author", "first_hour",
        F.explode(F.sequence("first_hour", ts_literal(grid_end), F.expr("INTERVAL 1 HOUR"))).alias("hour"),
    )
    dense = grid.join(hourly.drop("author_id"), on=["post_id", "hour"], how="left") \
        .fillna(0, subset=list(_COUNTS))
    ordered = Window.partitionBy("post_id").orderBy("hour")
    before_frame = ordered.rowsBetween(Window.unboundedPreceding, -1)
    with_before = dense.select(
        "post_id", "log_author", "first_hour", "hour",
        *(F.coalesce(F.sum(c).over(before_frame), F.lit(0)).alias(f"before_{c}") for c in _COUNTS),
    )
    windows = [
        (F.col(f"before_{k}") - F.coalesce(F.lag(f"before_{k}", hours).over(ordered), F.lit(0)))
        .alias(f"{k}_{w}")
        for w, hours in WINDOWS_HOURS.items() for k in KINDS
    ]
    return with_before.select(
        "post_id", "log_author", "first_hour", F.col("hour").alias("event_timestamp"), *windows,
        F.col("before_impressions").alias("impressions_total"),
        F.col("before_engaged").alias("engaged_total"),
        *(F.col(f"before_{c}").alias(f"{c}_total") for c in _HEAD_COUNTS),
    )


def author_hourly(hourly: DataFrame) -> DataFrame:
    """Per (author, hour bucket B) counts, stamped at ``B + 1 h`` (the first row stamp that counts them).

    Columns ``author_id``, ``event_timestamp`` and ``author_{c}`` for ``c`` in ``_AUTHOR_COUNTS``
    (impressions, ``pos_{head}``). ``hourly``: ``hourly_counts`` output.
    """
    return hourly.groupBy("author_id", (F.col("hour") + F.expr("INTERVAL 1 HOUR")).alias("event_timestamp")) \
        .agg(*(F.sum(c).alias(f"author_{c}") for c in _AUTHOR_COUNTS))


def content_features(impressions: DataFrame, posts: DataFrame, priors: RatePriors,
                     base_ts: pd.Timestamp, grid_end: pd.Timestamp | None = None) -> DataFrame:
    """The content feature rows (``post_id``, ``event_timestamp`` + ``CONTENT_VIEW`` features).

    Args:
        impressions: canonical impressions (``post_id``, ``event_ts``, heads).
        posts: canonical posts (``post_id``, ``created_ts``, ``duration_ms``, ``video_type``).
        priors: smoothing priors (click, long_view, like, engaged).
        base_ts: earliest stamp of a base row (2022-04-01T00:00Z unless the log starts earlier).
        grid_end: last grid hour (default ``grid_end_of(impressions)``).
    """
    grid_end = grid_end if grid_end is not None else grid_end_of(impressions)
    hourly = hourly_counts(impressions)
    grid = hourly_grid(hourly, grid_end)
    count_cols = [f"{k}_{w}" for w in WINDOWS_HOURS for k in KINDS] + ["impressions_total", "engaged_total"] \
        + [f"{c}_total" for c in _HEAD_COUNTS]

    firsts = grid.select("post_id", "log_author", "first_hour").distinct()
    ids = posts.select("post_id").unionByName(firsts.select("post_id")).distinct()
    base_ts_col = ts_literal(base_ts)
    base = ids.join(posts.select("post_id", "created_ts"), "post_id", "left") \
        .join(firsts, "post_id", "left") \
        .select("post_id", "log_author", "first_hour",
                F.greatest(F.coalesce("created_ts", base_ts_col), base_ts_col).alias("event_timestamp")) \
        .where(F.col("first_hour").isNull() | (F.col("event_timestamp") < F.col("first_hour"))) \
        .select("post_id", "log_author", "event_timestamp", *(F.lit(0).cast("long").alias(c) for c in count_cols))

    # the post's author: posts.author_id, else the impressions' (a post missing from posts)
    static = post_static(posts).drop("created_ts")
    post_rows = grid.select("post_id", "log_author", "event_timestamp", *count_cols).unionByName(base) \
        .join(static, "post_id", "left") \
        .select("*", F.coalesce("posts_author", "log_author").alias("author_id"), F.lit(0).alias("_event"))
    # The author's totals at each row: a running sum over the author's hourly counts (stamped at
    # bucket end) and the rows of all its posts, ordered by stamp, counts first at equal stamps.
    # Equivalent to a dense (author, hour) grid joined by (author_id, H), without building it.
    events = author_hourly(hourly).withColumn("_event", F.lit(1))
    upto = Window.partitionBy("author_id").orderBy("event_timestamp", F.desc("_event")) \
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    rows = post_rows.unionByName(events, allowMissingColumns=True) \
        .select("*", *(F.coalesce(F.sum(f"author_{c}").over(upto), F.lit(0)).alias(f"author_{c}_total")
                       for c in _AUTHOR_COUNTS)) \
        .where(F.col("_event") == 0)
    c = F.col
    return rows.select(
        "post_id", "event_timestamp",
        "post_duration_ms", "post_created_ts",
        F.coalesce("post_is_ad", F.lit(0)).alias("post_is_ad"),
        *(c(f"{k}_{w}").alias(f"post_{k}_{w}") for w in WINDOWS_HOURS for k in KINDS),
        smoothed_rate(c("clicks_24h"), c("impressions_24h"), priors.click).alias("post_click_rate_24h"),
        smoothed_rate(c("long_views_24h"), c("impressions_24h"), priors.long_view)
        .alias("post_long_view_rate_24h"),
        smoothed_rate(c("likes_7d"), c("impressions_7d"), priors.like).alias("post_like_rate_7d"),
        c("impressions_total").alias("post_impressions_total"),
        smoothed_rate(c("engaged_total"), c("impressions_total"), priors.engaged)
        .alias("post_engagement_rate_total"),
        *(smoothed_rate(c(f"pos_{h}_total"), c("impressions_total"), priors.head(h)).alias(post_prior_rate(h))
          for h in HEADS),
        c("author_impressions_total"),
        *(smoothed_rate(c(f"author_pos_{h}_total"), c("author_impressions_total"), priors.head(h))
          .alias(f"author_{h}_rate_total") for h in HEADS),
    )


SPEC = CONTENT_VIEW
