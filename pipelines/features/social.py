"""Social feature view (``core.schema.SOCIAL_VIEW``): a user's history with one author.

One row per (user_id, author_id, distinct impression time e), stamped ``e + 1 ms`` (point-in-time
rule in ``pipelines.features.common``), aggregating the user's impressions of that author's posts
with ``ts <= e``. Pairs in the users' pre-log history (``prelog_events``) also get a base row
stamped when that history is known (``pipelines.features.common.with_prelog``); a pair seen in
neither has no row (null features).

Features:
- ``ua_impressions``: n, impressions of the author's posts.
- ``ua_engagements``: sum over those impressions of the RealGraph-style weight
  (``ENGAGEMENT_EDGE_WEIGHTS`` summed over positive heads), as for social edges.
- ``ua_clicks``: impressions with click = 1.
- ``ua_follows``: 1 if any of them has follow = 1 (the user followed the author), else 0.
- ``ua_engagement_rate``: ``(e + prior * 10) / (n + 10)`` with e the impressions with any positive
  head (engaged impressions, so the rate is a share in [0, 1]) and prior ``RatePriors.engaged``.
- ``ua_long_views``: impressions with long_view = 1.
- ``ua_prelog_watches`` / ``ua_prelog_long_views``: the author's posts in the user's pre-log watch /
  long-view sequences (null before that history is known, for a user without one, and for an author outside it).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import SOCIAL_VIEW
from pipelines.features.common import (
    RatePriors,
    engaged_flag,
    engagement_weight,
    plus_one_ms,
    prelog_counts,
    smoothed_rate,
    with_prelog,
)


def social_features(impressions: DataFrame, priors: RatePriors, prelog: DataFrame | None = None) -> DataFrame:
    """The social feature rows (``user_id``, ``author_id``, ``event_timestamp`` + ``SOCIAL_VIEW``).

    Args:
        impressions: canonical impressions (``user_id``, ``author_id``, ``event_ts``, heads).
        priors: ``priors.engaged`` is the smoothing prior of ``ua_engagement_rate``.
        prelog: the canonical ``prelog_events`` table, or None (no pre-log history: the
            ``ua_prelog_*`` features are null).
    """
    per_ts = impressions.groupBy("user_id", "author_id", "event_ts").agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(engagement_weight()).alias("weight"),
        F.sum((F.col("click") > 0).cast("long")).alias("clicks"),
        F.sum(engaged_flag().cast("long")).alias("engaged"),
        F.max((F.col("follow") > 0).cast("long")).alias("followed"),
        F.sum((F.col("long_view") > 0).cast("long")).alias("long_views"),
    )
    # (user, author, ts) is unique after the groupBy: ROWS frame == RANGE frame with ties.
    running = Window.partitionBy("user_id", "author_id").orderBy("event_ts").rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    cum = {c: F.sum(c).over(running) for c in ("n", "weight", "clicks", "engaged", "long_views")}
    rows = per_ts.select(
        "user_id", "author_id",
        plus_one_ms(F.col("event_ts")).alias("event_timestamp"),
        cum["n"].alias("ua_impressions"),
        cum["weight"].alias("ua_engagements"),
        cum["clicks"].alias("ua_clicks"),
        F.max("followed").over(running).alias("ua_follows"),
        smoothed_rate(cum["engaged"], cum["n"], priors.engaged).alias("ua_engagement_rate"),
        cum["long_views"].alias("ua_long_views"),
    )
    keys = ("user_id", "author_id")
    if prelog is None:
        return rows.select("*", *(F.lit(None).cast("double").alias(c)
                                  for c in ("ua_prelog_watches", "ua_prelog_long_views")))
    zero = F.lit(0.0)
    out = with_prelog(rows, prelog_counts(prelog, keys), keys, base_values={
        "ua_impressions": zero, "ua_engagements": zero, "ua_clicks": zero,
        "ua_follows": F.lit(0).cast("long"), "ua_engagement_rate": F.lit(float(priors.engaged)),
        "ua_long_views": zero,
    })
    return out.withColumnRenamed("prelog_watches", "ua_prelog_watches") \
        .withColumnRenamed("prelog_long_views", "ua_prelog_long_views").drop("prelog_likes")


SPEC = SOCIAL_VIEW
