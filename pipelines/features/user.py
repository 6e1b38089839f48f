"""User feature view (``core.schema.USER_VIEW``): profile columns + rolling engagement rates.

Rows (point-in-time rule in ``pipelines.features.common``):
- one base row per user of the users table, stamped ``base_ts`` (2022-04-01T00:00Z unless the log
  starts earlier), with the profile and zero history (impressions 0, rates = priors);
- one row per (user_id, distinct impression time e), stamped ``e + 1 ms``, aggregating all of the
  user's impressions with ``ts <= e``.

Features:
- ``user_active_degree_code``: index of ``user_active_degree`` in ``ACTIVE_DEGREES`` (-1 unknown).
- ``user_is_video_author``: ``is_video_author`` (0/1; -1 for a user missing from the users table).
- ``user_follow_num`` / ``user_fans_num`` / ``user_friend_num`` / ``user_register_days``:
  ``follow_user_num`` / ``fans_user_num`` / ``friend_user_num`` / ``register_days`` (null if unknown).
- ``user_impressions``: n, the user's impressions so far.
- ``user_<head>_rate`` for click, long_view, like, follow, hate: ``(k + prior * 10) / (n + 10)``
  with k the impressions with that head = 1 and prior from ``RatePriors``.
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import ACTIVE_DEGREES, USER_VIEW
from pipelines.features.common import RatePriors, plus_one_ms, smoothed_rate, ts_literal

RATE_HEADS: tuple[str, ...] = ("click", "long_view", "like", "follow", "hate")


def user_history(impressions: DataFrame) -> DataFrame:
    """Cumulative per-user counts, one row per (user_id, distinct event_ts).

    Returns columns ``user_id``, ``event_timestamp`` (= event_ts + 1 ms), ``n`` (impressions with
    ts <= event_ts) and one count per ``RATE_HEADS`` head. Grouping by (user, ts) first makes the
    timestamps distinct within a user, so a running ROWS frame equals the RANGE frame that
    includes all same-millisecond ties.
    """
    per_ts = impressions.groupBy("user_id", "event_ts").agg(
        F.count(F.lit(1)).alias("n"),
        *(F.sum((F.col(h) > 0).cast("long")).alias(h) for h in RATE_HEADS),
    )
    running = Window.partitionBy("user_id").orderBy("event_ts").rowsBetween(
        Window.unboundedPreceding, Window.currentRow)
    return per_ts.select(
        "user_id",
        plus_one_ms(F.col("event_ts")).alias("event_timestamp"),
        *(F.sum(c).over(running).alias(c) for c in ("n", *RATE_HEADS)),
    )


def user_profile(users: DataFrame) -> DataFrame:
    """Profile feature columns of the canonical users table, keyed by ``user_id``."""
    degree_code = F.array_position(F.array(*(F.lit(d) for d in ACTIVE_DEGREES)),
                                   F.col("user_active_degree")) - 1
    return users.select(
        "user_id",
        F.coalesce(degree_code, F.lit(-1)).alias("user_active_degree_code"),
        F.col("is_video_author").alias("user_is_video_author"),
        F.col("follow_user_num").alias("user_follow_num"),
        F.col("fans_user_num").alias("user_fans_num"),
        F.col("friend_user_num").alias("user_friend_num"),
        F.col("register_days").alias("user_register_days"),
    )


def user_features(impressions: DataFrame, users: DataFrame, priors: RatePriors,
                  base_ts: pd.Timestamp) -> DataFrame:
    """The user feature rows (columns of ``USER_VIEW`` plus ``user_id``, ``event_timestamp``).

    Args:
        impressions: canonical impressions (``user_id``, ``event_ts`` and head columns).
        users: canonical users.
        priors: global rates for smoothing.
        base_ts: stamp of the zero-history profile rows (must not be after the first impression).
    """
    base = users.select(
        "user_id", ts_literal(base_ts).alias("event_timestamp"),
        *(F.lit(0).cast("long").alias(c) for c in ("n", *RATE_HEADS)),
    )
    counts = user_history(impressions).unionByName(base)
    rows = counts.join(user_profile(users), on="user_id", how="left")
    return rows.select(
        "user_id", "event_timestamp",
        F.coalesce("user_active_degree_code", F.lit(-1)).alias("user_active_degree_code"),
        F.coalesce("user_is_video_author", F.lit(-1)).alias("user_is_video_author"),
        "user_follow_num", "user_fans_num", "user_friend_num", "user_register_days",
        F.col("n").alias("user_impressions"),
        *(smoothed_rate(F.col(h), F.col("n"), getattr(priors, h)).alias(f"user_{h}_rate")
          for h in RATE_HEADS),
    )


SPEC = USER_VIEW
