"""The point-in-time training set: every impression with the features known just before it.

Written by ``training_set`` (Spark + Feast ``get_historical_features``) to the state folder, read
back by training, export checks and benches with ``load_training_set``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd

from core.requests import REQUEST_GAP_S, assign_requests, served_feature_ts
from core.schema import HEADS, HISTORY_FEATURES, HOME_SURFACE, RETRIEVAL_FEATURES, SEQUENCE_ID_FEATURES
from core.state import StateDir
from feature_repo import store as fs

TRAINING_SET_TABLE = "training_set"


def served_feature_rows(spark, store, impressions, posts: pd.DataFrame,
                        gap_s: float = REQUEST_GAP_S, history_state: StateDir | None = None) -> pd.DataFrame:
    """Impressions with the features serving had: grouped into requests, joined at the last materialisation.

    Every impression of one request (``core.requests.assign_requests``) gets the feature values
    the online store held when the request started (``core.requests.served_feature_ts``: rows
    stamped at or before the last hourly ``materialize``), and request-time features computed at
    the request's start and on the request's surface (its ``tab``), as the mixer computes them. So a user's features are one value for every
    candidate of a request, never a rate updated after each impression (which leaks the label
    order inside a user's log: see ``core.requests``).

    Args:
        spark: the Spark session; store: the Feast store (``feature_repo.store.open_store``).
        impressions: canonical impressions as a Spark DataFrame (``user_id``, ``post_id``,
            ``author_id``, ``event_ts``, ``date``, ``tab``, the heads); a filtered one is fine.
            A log without ``tab`` (older logs recorded no surface) is read as all on the home
            surface (``core.schema.HOME_SURFACE``): ``tab`` is filled with it, one request per
            user and gap, and the surface features say "home".
        posts: the canonical posts (pandas, at least ``post_id`` and ``primary_tag``): a row's
            ``tag_id`` (the key of the user x tag view) is its post's primary tag, -1 if none.
        gap_s: request inactivity gap, seconds.
        history_state: the state whose canonical tables give the history features
            (``pipelines.history_features``: the user action sequence before each request, the
            co-engagement neighbours of that day's index build; Spark). None leaves the
            ``HISTORY_FEATURES`` and ``SEQUENCE_ID_FEATURES`` columns NaN (what a mixer without the history hydrator serves).

    Returns:
        pandas DataFrame sorted by (``event_timestamp``, ``user_id``, ``post_id``): entity
        columns with ``event_timestamp`` the impression time (UTC), ``tag_id``, ``date``, ``tab``,
        ``request_id`` (int64), ``request_ts`` (request start, UTC), ``feature_ts`` (the
        materialisation the features come from, UTC), the ``HEADS`` labels and every feature of
        ``ALL_FEATURES`` (id buckets from ``core.id_features``).
    """
    from core.id_features import id_bucket_columns
    from core.request_features import add_request_features

    cols = ["user_id", "post_id", "author_id", "event_ts", "date", *HEADS]
    has_tab = "tab" in impressions.columns
    rows = impressions.select(*cols, *(["tab"] if has_tab else [])).toPandas()
    if not has_tab:
        rows["tab"] = np.int64(HOME_SURFACE)
    rows["event_ts"] = pd.to_datetime(rows["event_ts"], utc=True)
    rows = assign_requests(rows, gap_s, ts_col="event_ts")
    rows["feature_ts"] = served_feature_ts(rows["request_ts"])
    tags = posts.drop_duplicates("post_id").set_index("post_id")["primary_tag"]
    rows["tag_id"] = rows["post_id"].map(tags).fillna(-1).astype("int64")
    # One point-in-time join per distinct (user, post, author, tag, feature_ts): rows of one post
    # shown twice to a user within the hour share their features, and the join stays one row per key.
    keys = ["user_id", "post_id", "author_id", "tag_id", "feature_ts"]
    entity = rows[keys].drop_duplicates().rename(columns={"feature_ts": "event_timestamp"})
    entity["event_timestamp"] = entity["event_timestamp"].dt.tz_localize(None).astype("datetime64[us]")
    feats = fs.historical_features(store, spark.createDataFrame(entity))
    feats = feats.rename(columns={"event_timestamp": "feature_ts"})
    feats["feature_ts"] = pd.to_datetime(feats["feature_ts"], utc=True)
    if len(feats) != len(entity):
        raise RuntimeError(f"the point-in-time join returned {len(feats)} rows for {len(entity)} keys: "
                           "a feature table has duplicate (entity, event_timestamp) rows; rebuild the features")
    df = rows.rename(columns={"event_ts": "event_timestamp"}).merge(feats, on=keys, how="left", validate="many_to_one")
    df = add_request_features(df, df["request_ts"], surface=df["tab"])
    for col, values in id_bucket_columns(df["user_id"].to_numpy(), df["post_id"].to_numpy(),
                                         df["author_id"].to_numpy()).items():
        df[col] = values
    if history_state is not None:
        from pipelines.candidate_index import CanonicalTables
        from pipelines.history_features import add_history_features

        df = add_history_features(spark, df, CanonicalTables.load(history_state),
                                  log=lambda line: print(f"[history] {line}", flush=True))
    else:
        for col in HISTORY_FEATURES + SEQUENCE_ID_FEATURES:
            df[col] = np.nan
    for col in RETRIEVAL_FEATURES:  # a logged request has no retrieval model as of its time: missing
        df[col] = np.nan
    return df.sort_values(["event_timestamp", "user_id", "post_id"], kind="stable").reset_index(drop=True)


def training_set(spark, store, state: StateDir, gap_s: float = REQUEST_GAP_S) -> pd.DataFrame:
    """Point-in-time training set, as served: every impression with the features of its request.

    See ``served_feature_rows`` (the contract: features frozen at the last materialisation before
    the request started). Also written to the state folder as ``training_set.parquet`` so
    training can be re-run without Spark.

    Returns:
        The frame of ``served_feature_rows`` over every canonical impression.
    """
    imp = spark.read.parquet(str(state.table("impressions")))
    posts = pd.read_parquet(state.table("posts"), columns=["post_id", "primary_tag"])
    df = served_feature_rows(spark, store, imp, posts, gap_s, history_state=state)
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
