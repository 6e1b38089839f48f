"""The Spark session of home-mixer's batch jobs (local by default, a cluster by master URL).

The settings match ``feature_repo/feature_store.yaml`` so Feast's Spark offline store, which calls
``SparkSession.builder.getOrCreate()`` in the same process, reuses this session unchanged.
"""

from __future__ import annotations

import os

from pyspark.sql import SparkSession

DEFAULT_MASTER = "local[2]"
MASTER_ENV = "HOME_MIXER_SPARK_MASTER"

# Runtime settings. Why each one:
# - session time zone UTC: every timestamp in the tables is a UTC instant; no local-time surprises.
# - outputTimestampType TIMESTAMP_MICROS: parquet readers (pyarrow, Feast) get timestamp[us, UTC]
#   instead of the legacy INT96 encoding.
# - no console progress bars: they garble the batch jobs' own progress lines.
# - 8 shuffle partitions: the tables are small (<= a few million rows) and the machine has 2 cores;
#   Spark's default of 200 mostly schedules empty tasks.
SPARK_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "6g",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
}


def spark_session(app_name: str, master: str | None = None) -> SparkSession:
    """Get or create the process's Spark session with home-mixer's settings.

    Args:
        app_name: the application name shown in Spark logs.
        master: Spark master URL; default ``$HOME_MIXER_SPARK_MASTER`` or ``local[2]``. A cluster
            runs the same jobs with its URL (e.g. ``spark://host:7077``).

    Returns:
        The active ``SparkSession`` (``getOrCreate``: a session that already exists in this process,
        e.g. one Feast created, is reused; its runtime SQL settings are set to ``SPARK_CONF``).

    Sets ``SPARK_LOCAL_IP=127.0.0.1`` when unset: the driver must bind to loopback here (the host
    name does not resolve to a reachable address in sandboxes and CI).
    """
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    master = master or os.environ.get(MASTER_ENV, DEFAULT_MASTER)
    builder = SparkSession.builder.appName(app_name).master(master)
    # on a standalone cluster executors keep Spark's default 1g: an executor larger than every
    # worker offers would never be granted and the job would wait for resources forever
    for key, value in SPARK_CONF.items():
        builder = builder.config(key, value)
    session = builder.getOrCreate()
    session.sparkContext.setLogLevel("WARN")
    return session
