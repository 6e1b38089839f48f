"""What the feature jobs share: the point-in-time rule, smoothing, rate priors, typed table writing.

Point-in-time rule (``core.schema``): a feature row's ``event_timestamp`` is the first instant
its values are known, and a value at time t aggregates only events strictly before t. A
point-in-time join (Feast ``get_historical_features``) takes, per entity and request time t, the
latest row with ``event_timestamp <= t``. The jobs meet the rule in one of two ways:

- event-stamped rows (user, social, temporal): one row per (key, distinct event time e), stamped
  ``e + 1 ms``, aggregating every event with ``ts <= e`` (all same-millisecond events included).
  A join at t sees a row only if ``e + 1 ms <= t``, i.e. ``e < t``: events at t itself are never
  counted (with millisecond timestamps, ``e < t`` is ``e <= t - 1 ms``).
- hour-stamped rows (content): a row stamped at hour start H aggregates events in ``[H - W, H)``.

Rates are Bayesian-smoothed (additive smoothing toward a prior, as in empirical-Bayes CTR
estimation): ``rate = (k + prior * m) / (n + m)`` with ``m = SMOOTHING_M = 10`` pseudo-impressions,
``k`` positives out of ``n`` impressions, ``prior`` the global rate (``RatePriors``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import DoubleType, LongType, TimestampType

from core.schema import ENGAGEMENT_EDGE_WEIGHTS, HEADS, POSITIVE_HEADS, SMOOTHING_M, FeatureViewSpec
from core.state import StateDir

# Users and posts get a "known, no history yet" row at this time (earlier if the log starts
# earlier), so every known user/post has profile/static features. KuaiRand-Pure's log starts
# 2022-04-25 and its posts were uploaded 2022-04-09..11.
BASE_ROW_TS = pd.Timestamp("2022-04-01T00:00:00Z")
# Days at the start of the log whose labels the priors may use (the training period).
from core.schema import VALIDATION_DAYS  # noqa: E402  (days held out of the priors)
PRIORS_REPORT = "feature_priors.json"

_SPARK_TYPES = {"int64": LongType(), "float64": DoubleType()}


@dataclass(frozen=True)
class RatePriors:
    """Global rates the smoothed features shrink toward (fractions of impressions, in [0, 1]).

    Attributes:
        click, long_view, like, follow, comment, forward, hate: share of impressions with that
            head = 1 (one per ``core.schema.HEADS``).
        engaged: share of impressions with any positive head (``POSITIVE_HEADS``).
        period: human-readable description of the events they were computed from.

    Why all days but the last ``VALIDATION_DAYS`` (the validation days): the priors are constants inside every feature value, so
    computing them over the whole log would leak the evaluation days' label rates into training
    features. Over the training period itself the leak is one global constant per head, weighted by
    m = 10 pseudo-impressions, which is negligible and the usual practice for smoothing priors.
    Pass explicit priors (e.g. those written with the training tables) to reuse them unchanged on
    another log.
    """

    click: float
    long_view: float
    like: float
    follow: float
    hate: float
    engaged: float
    comment: float = 0.0
    forward: float = 0.0
    period: str = ""

    @classmethod
    def from_impressions(cls, impressions: DataFrame, holdout_days: int = VALIDATION_DAYS) -> "RatePriors":
        """Priors from the impressions of all local days (``date``) but the last ``holdout_days``.

        A log with no more than ``holdout_days`` days uses its first day only.

        Raises:
            ValueError: the impressions are empty.
        """
        dates = sorted(r["date"] for r in impressions.select("date").distinct().collect())
        if not dates:
            raise ValueError("cannot compute rate priors from an empty impressions table")
        used = dates[:-holdout_days] if len(dates) > holdout_days else dates[:1]
        rows = impressions.where(F.col("date") <= used[-1])
        heads = HEADS
        agg = rows.agg(
            *(F.avg((F.col(h) > 0).cast("double")).alias(h) for h in heads),
            F.avg(engaged_flag().cast("double")).alias("engaged"),
        ).first()
        return cls(**{k: float(agg[k]) for k in (*heads, "engaged")},
                   period=f"dates {used[0]}..{used[-1]} ({len(used)} days)")

    @classmethod
    def read_json(cls, path: Path) -> "RatePriors":
        """Priors written by ``write_json`` (e.g. ``<state>/reports/feature_priors.json``).

        Raises:
            FileNotFoundError: no such file (build the training features first).
            ValueError: the file lacks a head's prior (written by an older version: rebuild the
                training features with ``home-mixer features build``).
        """
        data = json.loads(Path(path).read_text())
        missing = [k for k in (*HEADS, "engaged") if k not in data]
        if missing:
            raise ValueError(f"{path} has no prior for {missing}: rebuild the training features "
                             "(`home-mixer features build` or `home-mixer demo`)")
        return cls(**{k: data[k] for k in (*HEADS, "engaged")}, period=data.get("period", ""))

    def head(self, head: str) -> float:
        """The prior of one head of ``core.schema.HEADS``."""
        return float(getattr(self, head))

    def write_json(self, path: Path) -> Path:
        """Write the priors and the smoothing constant m as JSON (parents created); returns ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**asdict(self), "smoothing_m": SMOOTHING_M}, indent=2))
        return path


def smoothed_rate(k, n, prior: float, m: float = SMOOTHING_M):
    """``(k + prior * m) / (n + m)``: works on Spark Columns, numpy arrays and numbers alike.

    With n = 0 it is the prior; it tends to k / n as n grows. In [0, 1] when 0 <= k <= n and the
    prior is in [0, 1].
    """
    return (k + prior * m) / (n + m)


def engaged_flag() -> Column:
    """Boolean Column: the impression has any positive head (click, long_view, like, ...)."""
    cond = F.lit(False)
    for head in POSITIVE_HEADS:
        cond = cond | (F.col(head) > 0)
    return cond


def engagement_weight() -> Column:
    """Double Column: sum of ``ENGAGEMENT_EDGE_WEIGHTS[h]`` over the positive heads of an impression.

    Same formula as ``pipelines.canonical.engagement_weight`` (RealGraph-style edge weight).
    """
    total = F.lit(0.0)
    for head in POSITIVE_HEADS:
        total = total + F.when(F.col(head) > 0, F.lit(ENGAGEMENT_EDGE_WEIGHTS[head])).otherwise(0.0)
    return total


def plus_one_ms(ts: Column) -> Column:
    """Timestamp Column + 1 millisecond (the stamp of a row including events up to ``ts``)."""
    return ts + F.expr("INTERVAL 1 MILLISECOND")


def epoch_seconds(ts: Column) -> Column:
    """Timestamp Column -> whole epoch seconds (floor), LongType."""
    return F.floor(F.unix_micros(ts) / F.lit(1_000_000)).cast(LongType())


def base_row_ts(impressions: DataFrame) -> pd.Timestamp:
    """``BASE_ROW_TS``, or the first impression's time if the log starts earlier (UTC)."""
    first = impressions.agg(F.min("event_ts").alias("t")).first()["t"]
    if first is None:
        return BASE_ROW_TS
    first = pd.Timestamp(first)
    first = first.tz_localize("UTC") if first.tzinfo is None else first.tz_convert("UTC")
    return min(BASE_ROW_TS, first)


def ts_literal(ts: pd.Timestamp) -> Column:
    """A UTC timestamp literal Column (microsecond precision)."""
    return F.timestamp_micros(F.lit(int(ts.value // 1000)))


def to_feature_table(frame: DataFrame, spec: FeatureViewSpec) -> DataFrame:
    """Select and cast ``frame`` to the table layout of ``spec``.

    Columns: ``spec.join_keys`` (LongType), ``event_timestamp`` (TimestampType, UTC), then
    ``spec.features`` in order with their dtypes (int64 -> LongType, float64 -> DoubleType).

    Raises:
        ValueError: a required column is missing (names the view and the columns).
    """
    needed = [*spec.join_keys, "event_timestamp", *spec.features]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise ValueError(f"{spec.name}: job output lacks columns {missing}")
    return frame.select(
        *(F.col(k).cast(LongType()).alias(k) for k in spec.join_keys),
        F.col("event_timestamp").cast(TimestampType()).alias("event_timestamp"),
        *(F.col(f).cast(_SPARK_TYPES[t]).alias(f) for f, t in spec.features.items()),
    )


def write_feature_table(frame: DataFrame, spec: FeatureViewSpec, state: StateDir) -> Path:
    """Write ``to_feature_table(frame, spec)`` as parquet to ``state.table(spec.table)`` (overwrite).

    Timestamps are written as TIMESTAMP_MICROS (pyarrow reads ``timestamp[us, tz=UTC]``).
    Returns the output folder.
    """
    path = state.table(spec.table)
    if path.is_file():  # a single-file table left by another writer
        path.unlink()
    frame.sparkSession.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    to_feature_table(frame, spec).write.mode("overwrite").parquet(str(path))
    return path


def read_table(spark: SparkSession, state: StateDir, name: str) -> DataFrame:
    """Read the canonical table ``name`` from ``state`` with Spark.

    Raises:
        FileNotFoundError: the table has not been built (run ``pipelines.canonical`` first).
    """
    path = state.table(name)
    if not path.exists():
        raise FileNotFoundError(
            f"canonical table {name} not found at {path}; build it first with "
            f"pipelines.canonical.build_canonical (or the batch pipeline runner)")
    return spark.read.parquet(str(path))


def remove_table(state: StateDir, name: str) -> None:
    """Delete a table (file or Spark folder) if present."""
    path = state.table(name)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def prelog_counts(prelog: DataFrame, keys: tuple[str, ...]) -> DataFrame:
    """Pre-log history counts per ``keys`` (e.g. ``("user_id", "author_id")``).

    Args:
        prelog: the canonical ``prelog_events`` table (``core.schema.PRELOG_EVENTS_COLUMNS``).
        keys: grouping columns of the table.

    Returns:
        ``keys`` + ``prelog_ts`` (when the history is known: the latest ``event_ts`` of the group)
        and the counts ``prelog_watches``, ``prelog_long_views``, ``prelog_likes`` (LongType).
    """
    return prelog.groupBy(*keys).agg(
        F.max("event_ts").alias("prelog_ts"),
        *(F.sum((F.col("kind") == kind).cast("long")).alias(f"prelog_{col}")
          for kind, col in (("watch", "watches"), ("long_view", "long_views"), ("like", "likes"))),
    )


def latest_before_prelog(rows: DataFrame, keys: tuple[str, ...], columns: list[str]) -> DataFrame:
    """Per key, ``columns`` of the latest row of ``rows`` stamped strictly before its ``prelog_ts``,
    renamed ``_last_<column>``: what a pre-log row stamped at ``prelog_ts`` must carry so it does
    not hide the log counts known before it. ``rows`` holds ``keys``, ``event_timestamp``,
    ``prelog_ts`` and ``columns``; keys without such a row are absent."""
    latest = Window.partitionBy(*keys).orderBy(F.desc("event_timestamp"))
    return (rows.where(F.col("event_timestamp") < F.col("prelog_ts"))
            .withColumn("_rank", F.row_number().over(latest)).where(F.col("_rank") == 1)
            .select(*keys, *(F.col(c).alias(f"_last_{c}") for c in columns)))


def with_prelog(rows: DataFrame, counts: DataFrame, keys: tuple[str, ...],
                base_values: dict[str, Column]) -> DataFrame:
    """Event-stamped feature rows plus the pre-log history of their key, point-in-time.

    Every row of ``rows`` (``keys``, ``event_timestamp``, log features) gets the ``prelog_*``
    counts of its key, but only when the row is stamped at or after the history's ``prelog_ts``
    (before it the history is not known yet: null). Each key of ``counts`` also gets a row
    stamped ``prelog_ts`` carrying the key's latest log features from before that instant (or
    ``base_values``, e.g. zero impressions, when there are none), so the history becomes visible
    when it is known without hiding earlier log counts. Such a row that would share its (key,
    timestamp) with a log row is dropped (the log row holds the same history and more).

    Returns:
        ``rows``' columns + ``prelog_watches``, ``prelog_long_views``, ``prelog_likes``.
    """
    prelog_cols = ("prelog_watches", "prelog_long_views", "prelog_likes")
    log_cols = [c for c in rows.columns if c not in (*keys, "event_timestamp")]
    joined = rows.join(counts, on=list(keys), how="left")
    known = F.col("event_timestamp") >= F.col("prelog_ts")
    log_rows = joined.select(
        *rows.columns, *(F.when(known, F.col(c)).alias(c) for c in prelog_cols))
    before = latest_before_prelog(joined, keys, log_cols)
    base = counts.join(before, on=list(keys), how="left").select(
        *keys, F.col("prelog_ts").alias("event_timestamp"),
        *(F.coalesce(F.col(f"_last_{c}"), base_values[c]).alias(c) for c in log_cols),
        *prelog_cols,
    ).join(rows.select(*keys, "event_timestamp"), on=[*keys, "event_timestamp"], how="left_anti")
    return log_rows.unionByName(base)
