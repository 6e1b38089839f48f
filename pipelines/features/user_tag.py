"""User x tag feature view (``core.schema.USER_TAG_VIEW``): a user's history with one category.

A post's tag is its primary tag (``posts.primary_tag``, the first of KuaiRand's tag ids); posts
without a tag (-1) have no user x tag rows. One row per (user_id, tag_id, distinct impression
time e), stamped ``e + 1 ms`` (point-in-time rule in ``pipelines.features.common``), aggregating
the user's impressions of that tag's posts with ``ts <= e``; plus a base row per pair of the
user's pre-log history, stamped when that history is known (``common.with_prelog``).

Features:
- ``ut_impressions``: n, impressions of the tag's posts.
- ``ut_click_rate`` / ``ut_long_view_rate`` / ``ut_like_rate``: ``(k + prior * 10) / (n + 10)``.
- ``ut_prelog_watches`` / ``ut_prelog_long_views``: the tag's posts in the user's pre-log watch /
  long-view sequences (null before that history is known, for a user without one, and for a tag outside it).

Affinity by category is the interest signal of Twitter's SimClusters / topic features, reduced
to the data KuaiRand has: the user's own history per tag.
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import USER_TAG_VIEW
from pipelines.features.common import RatePriors, plus_one_ms, prelog_counts, smoothed_rate, with_prelog

RATE_HEADS: tuple[str, ...] = ("click", "long_view", "like")


def user_tag_features(impressions: DataFrame, posts: DataFrame, priors: RatePriors,
                      prelog: DataFrame | None = None) -> DataFrame:
    """The user x tag rows (``user_id``, ``tag_id``, ``event_timestamp`` + ``USER_TAG_VIEW``).

    Args:
        impressions: canonical impressions (``user_id``, ``post_id``, ``event_ts``, heads).
        posts: canonical posts (``post_id``, ``primary_tag``).
        priors: smoothing priors of the rates.
        prelog: canonical ``prelog_events`` (has ``tag_id``), or None (``ut_prelog_*`` null).
    """
    tags = posts.select("post_id", F.col("primary_tag").alias("tag_id")).where(F.col("tag_id") >= 0)
    per_ts = impressions.join(tags, "post_id", "inner").groupBy("user_id", "tag_id", "event_ts").agg(
        F.count(F.lit(1)).alias("n"),
        *(F.sum((F.col(h) > 0).cast("long")).alias(h) for h in RATE_HEADS),
    )
    # (user, tag, ts) is unique after the groupBy: ROWS frame == RANGE frame with ties.
    running = Window.partitionBy("user_id", "tag_id").orderBy("event_ts").rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    n = F.sum("n").over(running)
    rows = per_ts.select(
        "user_id", "tag_id", plus_one_ms(F.col("event_ts")).alias("event_timestamp"),
        n.alias("ut_impressions"),
        *(smoothed_rate(F.sum(h).over(running), n, priors.head(h)).alias(f"ut_{h}_rate") for h in RATE_HEADS),
    )
    if prelog is None:
        return rows.select("*", *(F.lit(None).cast("double").alias(c)
                                  for c in ("ut_prelog_watches", "ut_prelog_long_views")))
    keys = ("user_id", "tag_id")
    out = with_prelog(rows, prelog_counts(prelog.where(F.col("tag_id") >= 0), keys), keys, base_values={
        "ut_impressions": F.lit(0).cast("long"),
        **{f"ut_{h}_rate": F.lit(float(priors.head(h))) for h in RATE_HEADS},
    })
    return out.withColumnRenamed("prelog_watches", "ut_prelog_watches") \
        .withColumnRenamed("prelog_long_views", "ut_prelog_long_views").drop("prelog_likes")


SPEC = USER_TAG_VIEW
