"""The point-in-time training set: every impression with the features known just before it.

Written by ``training_set`` (Spark + Feast ``get_historical_features``) to the state folder, read
back by training, export checks and benches with ``load_training_set``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pandas as pd

from core.schema import HEADS
from core.state import StateDir
from feature_repo import store as fs

TRAINING_SET_TABLE = "training_set"


def training_set(spark, store, state: StateDir) -> pd.DataFrame:
    """Point-in-time training set: every impression with the features known just before it.

    Returns:
        pandas DataFrame sorted by ``event_timestamp``: entity columns, ``date``, the labels of
        ``schema.HEADS``, every feature of ``schema.ALL_FEATURES``. Also written to the state
        folder as ``training_set.parquet`` so training can be re-run without Spark.
    """
    from pyspark.sql import functions as F

    from core.request_features import add_request_features

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


def log_span(state: StateDir) -> tuple[datetime, datetime]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    ts = pq.read_table(state.table("impressions"), columns=["event_ts"]).column(0)
    return pc.min(ts).as_py(), pc.max(ts).as_py()


def log_end(state: StateDir) -> datetime:
    """The hour boundary after the last impression of the canonical log (UTC): "now" for serving."""
    last = log_span(state)[1]
    return (last + timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
