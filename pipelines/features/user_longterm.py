"""Long-window user propensities (``core.schema.USER_LONGTERM_VIEW``): daily snapshots + pre-log history.

Why not per impression: a rate updated after every impression moves with each label, so inside a
user's log a positive row carries the user's lowest rate so far (``core.requests``). A propensity
that changes once a day is what a daily batch job gives serving, and it cannot encode the order of
the labels within the day.

Rows (point-in-time: a row's values are known at its stamp):
- a base row per user of the users table at ``base_ts``: no history (counts 0, rates = priors,
  pre-log features null);
- a pre-log row per user with a pre-log history, stamped when it is known (the user's
  ``last_time_ms`` + 1 ms): its pre-log features and the latest snapshot's log features before
  then (none: counts 0); it replaces the base row when it is not later than it;
- a snapshot row per (user, local day D after one with impressions), stamped at local midnight
  (UTC+8, the log's ``date``) of D: every impression of the log on days before D, plus the pre-log
  features.

Features:
- ``user_lt_prelog_watches``: videos in the pre-log watch sequence (KuaiRand keeps the last 50).
- ``user_lt_prelog_long_view_rate`` / ``_like_rate``: long views / likes in the pre-log sequences
  over its watches, smoothed ``(k + prior * 10) / (n + 10)`` and capped at 1 (the long-view list
  can reach further back than the 50 watches).
- ``user_lt_impressions``: log impressions on earlier days; ``user_lt_active_days``: such days.
- ``user_lt_<head>_rate`` for every head: smoothed rate over those impressions.
"""

from __future__ import annotations

import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import HEADS, USER_LONGTERM_VIEW
from pipelines.features.common import RatePriors, latest_before_prelog, prelog_counts, smoothed_rate, ts_literal

# The log's ``date`` is a local (China, UTC+8) calendar day; snapshots are at local midnight.
LOCAL_TIMEZONE = "Asia/Shanghai"


def local_midnight_after(date_col) -> F.Column:
    """UTC timestamp of the local midnight that ends day ``date_col`` (int yyyymmdd)."""
    day = F.to_date(date_col.cast("string"), "yyyyMMdd")
    return F.to_utc_timestamp(F.date_add(day, 1).cast("timestamp"), LOCAL_TIMEZONE)


def user_longterm_features(impressions: DataFrame, users: DataFrame, priors: RatePriors,
                           base_ts: pd.Timestamp, prelog: DataFrame | None = None) -> DataFrame:
    """The long-window user rows (``user_id``, ``event_timestamp`` + ``USER_LONGTERM_VIEW``).

    Args:
        impressions: canonical impressions (``user_id``, ``date``, heads).
        users: canonical users (every user gets a base row).
        priors: smoothing priors.
        base_ts: stamp of the zero-history rows.
        prelog: canonical ``prelog_events`` or None (pre-log features null).
    """
    spark = impressions.sparkSession
    if prelog is None:
        counts = spark.createDataFrame([], "user_id long, prelog_ts timestamp, prelog_watches long, "
                                           "prelog_long_views long, prelog_likes long")
    else:
        counts = prelog_counts(prelog, ("user_id",))
    pre = counts.select(
        "user_id", "prelog_ts",
        F.col("prelog_watches").cast("double").alias("user_lt_prelog_watches"),
        F.least(F.lit(1.0), smoothed_rate(F.col("prelog_long_views"), F.col("prelog_watches"),
                                          priors.long_view)).alias("user_lt_prelog_long_view_rate"),
        F.least(F.lit(1.0), smoothed_rate(F.col("prelog_likes"), F.col("prelog_watches"),
                                          priors.like)).alias("user_lt_prelog_like_rate"),
    )
    daily = impressions.groupBy("user_id", "date").agg(
        F.count(F.lit(1)).alias("n"), *(F.sum((F.col(h) > 0).cast("long")).alias(h) for h in HEADS))
    running = Window.partitionBy("user_id").orderBy("date").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    n = F.sum("n").over(running)
    snapshots = daily.select(
        "user_id", local_midnight_after(F.col("date")).alias("event_timestamp"),
        n.alias("user_lt_impressions"), F.count(F.lit(1)).over(running).alias("user_lt_active_days"),
        *(smoothed_rate(F.sum(h).over(running), n, priors.head(h)).alias(f"user_lt_{h}_rate") for h in HEADS),
    )
    zero_values = [F.lit(0.0), F.lit(0.0), *(F.lit(float(priors.head(h))) for h in HEADS)]
    zero_log = [v.alias(c) for v, c in zip(zero_values, ("user_lt_impressions", "user_lt_active_days",
                                                          *(f"user_lt_{h}_rate" for h in HEADS)))]
    pre_cols = ("user_lt_prelog_watches", "user_lt_prelog_long_view_rate", "user_lt_prelog_like_rate")
    base = users.select("user_id", ts_literal(base_ts).alias("event_timestamp"), *zero_log,
                        *(F.lit(None).cast("double").alias(c) for c in pre_cols), F.lit(0).alias("priority"))
    log_cols = [c for c in snapshots.columns if c not in ("user_id", "event_timestamp")]
    before = latest_before_prelog(snapshots.join(pre.select("user_id", "prelog_ts"), "user_id"), ("user_id",),
                                  log_cols)
    pre_rows = pre.join(before, "user_id", "left").select(
        "user_id", F.col("prelog_ts").alias("event_timestamp"),
        *(F.coalesce(F.col(f"_last_{c}"), z).alias(c) for c, z in zip(log_cols, zero_values)),
        *pre_cols, F.lit(1).alias("priority"))
    # a history known before base_ts replaces the base row (which would hide it)
    base = base.join(pre.where(F.col("prelog_ts") <= ts_literal(base_ts)).select("user_id"), "user_id", "left_anti")
    # a snapshot carries the pre-log features once they are known
    snap = snapshots.join(pre, "user_id", "left").select(
        "user_id", "event_timestamp", *(c for c in snapshots.columns if c not in ("user_id", "event_timestamp")),
        *(F.when(F.col("event_timestamp") >= F.col("prelog_ts"), F.col(c)).alias(c) for c in pre_cols),
        F.lit(2).alias("priority"),
    )
    rows = base.unionByName(pre_rows).unionByName(snap)
    # one row per (user, stamp): on a tie the row that knows more wins (snapshot > pre-log > base)
    rank = F.row_number().over(Window.partitionBy("user_id", "event_timestamp").orderBy(F.desc("priority")))
    return rows.withColumn("_rank", rank).where(F.col("_rank") == 1).drop("_rank", "priority")


SPEC = USER_LONGTERM_VIEW
