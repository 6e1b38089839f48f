"""Temporal feature view (``core.schema.TEMPORAL_VIEW``): recency and session depth per user.

One row per (user_id, distinct impression time e), stamped ``e + 1 ms`` (point-in-time rule in
``pipelines.features.common``); no base rows (a user without impressions has no temporal row).

Features, for the user's impressions up to and including e:
- ``tmp_last_impression_ts``: e in whole epoch seconds (floor), the last impression included.
- ``tmp_impressions_1h`` / ``tmp_impressions_24h``: impressions with ``e - W < ts <= e``,
  W = 1 h / 24 h (all same-millisecond impressions at e included).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from core.schema import TEMPORAL_VIEW
from pipelines.features.common import epoch_seconds, plus_one_ms

WINDOWS_MS: dict[str, int] = {"1h": 3_600_000, "24h": 86_400_000}


def temporal_features(impressions: DataFrame) -> DataFrame:
    """The temporal feature rows (``user_id``, ``event_timestamp`` and ``TEMPORAL_VIEW`` features).

    Args:
        impressions: canonical impressions (``user_id``, ``event_ts``).
    """
    per_ts = impressions.groupBy("user_id", "event_ts").agg(F.count(F.lit(1)).alias("n")) \
        .withColumn("ms", F.unix_millis("event_ts"))
    ordered = Window.partitionBy("user_id").orderBy("ms")
    # RANGE frame on epoch ms: (e - W, e] is [e - W + 1 ms, e].
    windows = {name: F.sum("n").over(ordered.rangeBetween(-(w - 1), Window.currentRow))
               for name, w in WINDOWS_MS.items()}
    return per_ts.select(
        "user_id",
        plus_one_ms(F.col("event_ts")).alias("event_timestamp"),
        epoch_seconds(F.col("event_ts")).alias("tmp_last_impression_ts"),
        *(col.alias(f"tmp_impressions_{name}") for name, col in windows.items()),
    )


SPEC = TEMPORAL_VIEW
