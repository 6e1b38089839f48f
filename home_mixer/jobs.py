"""The main jobs of home-mixer, each a function the CLI and the demo call in order.

raw logs -> validated canonical tables -> Spark offline features -> Feast apply -> point-in-time
training set -> light + heavy rankers in MLflow -> materialise to Redis -> candidate index -> mixer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd

from home_mixer import feature_store as fs
from home_mixer.schema import HEADS
from home_mixer.services import RedisServer, ServiceError, feast_connection_string
from home_mixer.state import StateDir

TRAINING_SET_TABLE = "training_set"


def redis_url_for(state: StateDir) -> str:
    """The Redis to use: ``HOME_MIXER_REDIS_URL`` or the server ``home-mixer services start`` left.

    Raises:
        ServiceError: neither exists.
    """
    url = os.environ.get("HOME_MIXER_REDIS_URL")
    if url:
        return url
    srv = RedisServer.running(state)
    if srv is None:
        raise ServiceError("no Redis is running for this state folder: run `home-mixer services start` "
                           "(or set HOME_MIXER_REDIS_URL=redis://host:port/0).")
    return srv.url


feast_connection = feast_connection_string


@dataclass
class DataReport:
    """What the data stage did: rows read, duplicates dropped, tables written."""

    stats: object
    validation: object


def prepare_data(state: StateDir, data_dir: Path, log_paths: list[Path] | None = None) -> DataReport:
    """Load raw files, validate them (great-expectations), write the canonical tables.

    Args:
        data_dir: folder with the KuaiRand-Pure files (users, videos and, by default, the log).
        log_paths: impression logs to use instead of the shared one (concatenated, de-duplicated).

    Raises:
        pipelines.validation.DataValidationError: a file failed its suite (names file, column,
            expectation); nothing is written.
    """
    from pipelines.canonical import build_canonical
    from pipelines.raw import load_raw
    from pipelines.validation import validate_raw

    raw = load_raw(data_dir, log_paths=log_paths)
    report = validate_raw(raw, report_dir=state.reports)
    stats = build_canonical(raw, state)
    return DataReport(stats=stats, validation=report)


def build_features(spark, state: StateDir, priors=None) -> dict[str, int]:
    """Run the Spark feature jobs; returns row counts per feature table.

    Args:
        priors: ``pipelines.features.common.RatePriors`` to smooth with (default: computed from
            this state's impressions, validation days held out). Evaluation passes the training
            state's priors so features mean the same as in training.
    """
    from pipelines.features import build_offline_features

    return build_offline_features(spark, state, priors=priors)


def training_set(spark, store, state: StateDir) -> pd.DataFrame:
    """Point-in-time training set: every impression with the features known just before it.

    Returns:
        pandas DataFrame sorted by ``event_timestamp``: entity columns, ``date``, the labels of
        ``schema.HEADS``, every feature of ``schema.ALL_FEATURES``. Also written to the state
        folder as ``training_set.parquet`` so training can be re-run without Spark.
    """
    from pyspark.sql import functions as F

    from pipelines.request_features import add_request_features

    imp = spark.read.parquet(str(state.table("impressions")))
    entity = imp.select("user_id", "post_id", "author_id", F.col("event_ts").alias("event_timestamp"),
                        "date", *HEADS)
    df = fs.historical_features(store, entity)
    df["event_timestamp"] = pd.to_datetime(df["event_timestamp"], utc=True)
    df = add_request_features(df, df["event_timestamp"])
    df = df.sort_values(["event_timestamp", "user_id", "post_id"], kind="stable").reset_index(drop=True)
    df.to_parquet(state.table(TRAINING_SET_TABLE), index=False, coerce_timestamps="us")
    return df


def load_training_set(state: StateDir) -> pd.DataFrame:
    """The training set the last ``training_set`` call wrote.

    Raises:
        FileNotFoundError: with the command to run first.
    """
    path = state.table(TRAINING_SET_TABLE)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run `home-mixer features build` first.")
    return pd.read_parquet(path)


def _log_span(state: StateDir) -> tuple[datetime, datetime]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ts = pq.read_table(state.table("impressions"), columns=["event_ts"]).column(0)
    return pc.min(ts).as_py(), pc.max(ts).as_py()


def log_end(state: StateDir) -> datetime:
    """The hour boundary after the last impression of the canonical log (UTC): "now" for serving."""
    last = _log_span(state)[1]
    return (last + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)


def materialize(store, state: StateDir) -> tuple[datetime, datetime]:
    """Fill the Redis online store with the latest feature values, from the features' base rows
    (``pipelines.features.common.BASE_ROW_TS`` or the first impression if earlier) to ``log_end``."""
    from pipelines.features.common import BASE_ROW_TS

    start = min(BASE_ROW_TS.to_pydatetime(), _log_span(state)[0])
    end = log_end(state)
    fs.materialize(store, start, end)
    return start, end
