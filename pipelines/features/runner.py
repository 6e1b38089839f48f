"""Run the offline feature jobs: canonical tables -> the feature tables of ``core.schema.FEATURE_VIEWS``.

``build_offline_features`` prints one progress line per stage with the time it took. The whole
batch data path (raw -> validation -> canonical -> features) is ``home-mixer features build``.
"""

from __future__ import annotations

from collections.abc import Callable

from pyspark.sql import SparkSession

from core.schema import CONTENT_VIEW, SOCIAL_VIEW, TEMPORAL_VIEW, USER_LONGTERM_VIEW, USER_TAG_VIEW, USER_VIEW
from core.stages import StageTimer
from core.state import StateDir
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
from pipelines.features.user_longterm import user_longterm_features
from pipelines.features.user_tag import user_tag_features


def build_offline_features(spark: SparkSession, state: StateDir, priors: RatePriors | None = None,
                           log: Callable[[str], None] = print) -> dict[str, int]:
    """Build every feature table of ``core.schema.FEATURE_VIEWS`` from the canonical tables.

    The pre-log history (``prelog_events``) is optional: without it the ``*_prelog_*`` features
    are null.

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
    clock = StageTimer(prefix="features", log=log)
    impressions = read_table(spark, state, "impressions").cache()
    users = read_table(spark, state, "users")
    posts = read_table(spark, state, "posts")
    prelog = read_table(spark, state, "prelog_events") if state.table("prelog_events").exists() else None
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
            (SOCIAL_VIEW, lambda: social_features(impressions, priors, prelog)),
            (TEMPORAL_VIEW, lambda: temporal_features(impressions)),
            (USER_LONGTERM_VIEW, lambda: user_longterm_features(impressions, users, priors, base_ts, prelog)),
            (USER_TAG_VIEW, lambda: user_tag_features(impressions, posts, priors, prelog)),
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
