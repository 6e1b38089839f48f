"""Run the offline feature jobs, and the whole batch data path (raw -> validation -> canonical -> features).

``build_offline_features`` reads the canonical tables of a state folder and writes the four feature
tables of ``home_mixer.schema.FEATURE_VIEWS``; ``run_batch_pipeline`` runs every stage from the raw
files. Both print one progress line per stage with the time it took.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from pyspark.sql import SparkSession

from home_mixer.schema import CONTENT_VIEW, SOCIAL_VIEW, TEMPORAL_VIEW, USER_VIEW
from home_mixer.state import StateDir
from pipelines.features.common import (
    PRIORS_REPORT,
    RatePriors,
    base_row_ts,
    read_table,
    write_feature_table,
)
from pipelines.features.content import content_features
from pipelines.features.social import social_features
from pipelines.features.temporal import temporal_features
from pipelines.features.user import user_features


@dataclass
class StageClock:
    """Times named stages and reports each as ``[prefix] stage: detail (12.3 s)`` through ``log``."""

    prefix: str = "batch"
    log: Callable[[str], None] = print
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Context manager timing one stage; put a ``detail`` string into the yielded dict."""
        info: dict = {}
        start = time.perf_counter()
        self.log(f"[{self.prefix}] {name} ...")
        yield info
        self.seconds[name] = time.perf_counter() - start
        detail = f": {info['detail']}" if "detail" in info else ""
        self.log(f"[{self.prefix}] {name} done{detail} ({self.seconds[name]:.1f} s)")


def build_offline_features(spark: SparkSession, state: StateDir, priors: RatePriors | None = None,
                           log: Callable[[str], None] = print) -> dict[str, int]:
    """Build the user, content, social and temporal feature tables from the canonical tables.

    Args:
        spark: the Spark session (``pipelines.spark.spark_session``).
        state: state folder holding the canonical tables; feature tables are written to
            ``state.table(<view table>)`` as parquet folders (overwritten).
        priors: smoothing priors; default ``RatePriors.from_impressions`` (first 8 days of the log).
            They are written to ``state.reports / "feature_priors.json"``.
        log: receives one progress line per stage (default ``print``).

    Returns:
        Row count per feature table, e.g. ``{"user_features": 194000, ...}``.

    Raises:
        FileNotFoundError: a canonical table is missing.
    """
    clock = StageClock("features", log)
    impressions = read_table(spark, state, "impressions").cache()
    users = read_table(spark, state, "users")
    posts = read_table(spark, state, "posts")
    try:
        with clock.stage("priors") as info:
            priors = priors or RatePriors.from_impressions(impressions)
            base_ts = base_row_ts(impressions)
            priors.write_json(state.reports / PRIORS_REPORT)
            info["detail"] = (f"click={priors.click:.4f} long_view={priors.long_view:.4f} "
                              f"engaged={priors.engaged:.4f} from {priors.period}; base rows at {base_ts}")
        jobs = (
            (USER_VIEW, lambda: user_features(impressions, users, priors, base_ts)),
            (CONTENT_VIEW, lambda: content_features(impressions, posts, priors, base_ts)),
            (SOCIAL_VIEW, lambda: social_features(impressions, priors)),
            (TEMPORAL_VIEW, lambda: temporal_features(impressions)),
        )
        counts: dict[str, int] = {}
        for spec, job in jobs:
            with clock.stage(spec.table) as info:
                path = write_feature_table(job(), spec, state)
                counts[spec.table] = spark.read.parquet(str(path)).count()
                info["detail"] = f"{counts[spec.table]:,} rows -> {path}"
        return counts
    finally:
        impressions.unpersist()


def run_batch_pipeline(data_dir: Path, state: StateDir, spark: SparkSession | None = None,
                       log_paths: list[Path] | None = None, log: Callable[[str], None] = print) -> dict:
    """Raw files -> validation -> canonical tables -> offline feature tables, in ``state``.

    Args:
        data_dir: folder of the raw KuaiRand-Pure files (``pipelines.raw``).
        state: the state folder (created if absent).
        spark: a Spark session (default: ``pipelines.spark.spark_session("home-mixer-batch")``).
        log_paths: log files of the same schema to use instead of the default log (concatenated).
        log: receives the progress lines.

    Returns:
        ``{"seconds": {stage: s}, "canonical": CanonicalStats dict, "features": {table: rows},
        "validation": {"expectations": n, "rows": {file: rows}}}``.

    Raises:
        RawDataMissingError, RawDataParseError: raw files absent or malformed.
        DataValidationError: the raw data failed validation (report in ``state.reports``).
    """
    from pipelines.canonical import build_canonical
    from pipelines.raw import load_raw
    from pipelines.spark import spark_session
    from pipelines.validation import validate_raw

    state.ensure()
    clock = StageClock("batch", log)
    with clock.stage("load raw") as info:
        raw = load_raw(data_dir, log_paths=log_paths)
        info["detail"] = f"log {len(raw.log):,}, users {len(raw.users):,}, videos {len(raw.videos):,} rows"
    with clock.stage("validate raw") as info:
        report = validate_raw(raw, state.reports)
        info["detail"] = f"{len(report.outcomes)} expectations passed"
    with clock.stage("canonical tables") as info:
        stats = build_canonical(raw, state)
        info["detail"] = (f"{stats.impressions:,} impressions ({stats.duplicates_dropped:,} duplicates, "
                          f"{stats.unknown_video_rows:,} unknown videos dropped), "
                          f"{stats.follow_edges + stats.engagement_edges:,} social edges")
    with clock.stage("spark session"):
        spark = spark or spark_session("home-mixer-batch")
    with clock.stage("offline features") as info:
        counts = build_offline_features(spark, state, log=log)
        info["detail"] = ", ".join(f"{k} {v:,}" for k, v in counts.items())
    return {
        "seconds": dict(clock.seconds),
        "canonical": stats.to_dict(),
        "features": counts,
        "validation": {"expectations": len(report.outcomes), "rows": report.rows},
    }
