"""Training from logged features: the mixer's feature log joined with engagement labels.

The mixer logs, for every post it served, the feature row its rankers saw (``FeatureLogSideEffect``
-> the capped Redis stream ``core.online_layout.SERVED_FEATURES``, encoding ``core.feature_log``).
This module reads that stream back and labels each served post from the impression log, so a model
trains on exactly what serving saw (``home-mixer train --from-logged``), as Twitter's home-mixer
trains on its logged served features.

Labels: the canonical impressions table of the state folder (``<state>/tables/impressions``: the
log's impressions with their engagement labels) is the record of what users did here; the stream
bus carries the same engagements only when a replay runs, and trims them. A logged serve of
``(user, post)`` at request time ``as_of`` takes the labels of the first logged impression of the
same ``(user, post)`` in ``[as_of, as_of + window_s)``. A serve with no such impression is dropped:
the user never saw that post in the log, so it has no label (not a negative). In the demo the mixer
replays users of the log, so serves at a request clock inside the log find their impressions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import redis

from core import online_layout as keys
from core.feature_log import decode_features
from core.schema import ALL_FEATURES, HEADS

DEFAULT_LABEL_WINDOW_S = 3600.0


class EmptyFeatureLogError(RuntimeError):
    """The feature-log stream holds no entries (or none that found a label)."""


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _epoch_us(values: list[str]) -> pd.Series:
    """Decimal epoch seconds (logged with at most 6 decimals) -> datetime64[ns, UTC], rounded to the
    microsecond (float seconds -> ns would leave ~100 ns of binary rounding)."""
    us = np.round(np.array(values, dtype=np.float64) * 1e6).astype(np.int64)
    return pd.Series(pd.to_datetime(us, unit="us", utc=True)).astype("datetime64[ns, UTC]")


def read_feature_log(client: redis.Redis, stream: str = keys.SERVED_FEATURES, *, batch: int = 10_000,
                     limit: int | None = None) -> pd.DataFrame:
    """Read and decode the feature-log stream, oldest entry first.

    Args:
        client: the Redis the mixer logs to (``decode_responses`` False or True both work for the
            text fields; the ``features`` bytes need ``decode_responses=False``).
        stream: the stream key.
        batch: entries per ``XRANGE`` call.
        limit: read at most this many entries (None: all).

    Returns:
        One row per served post: ``stream_id`` (str), ``serve_request_id`` (the mixer's hex request
        id), ``user_id``, ``post_id``, ``author_id`` (int64), ``surface`` (float64, NaN when the
        request named none), ``as_of`` (request clock, datetime64[ns, UTC]), ``served_at`` (wall
        clock, datetime64[ns, UTC]), ``light_ranker_version``, ``heavy_ranker_version`` (str) and
        every ``ALL_FEATURES`` column (float64, NaN = missing).

    Raises:
        EmptyFeatureLogError: the stream is missing or empty (with what to do).
        ValueError: entries were logged under another feature schema (``core.feature_log``).
        redis.RedisError: Redis is unreachable.
    """
    entries: list[tuple[bytes, dict]] = []
    start = "-"
    while limit is None or len(entries) < limit:
        n = batch if limit is None else min(batch, limit - len(entries))
        chunk = client.xrange(stream, min=start, max="+", count=n)
        if not chunk:
            break
        entries.extend(chunk)
        start = "(" + _text(chunk[-1][0])
        if len(chunk) < n:
            break
    if not entries:
        raise EmptyFeatureLogError(
            f"the feature log {stream!r} is empty: no served features to train on. Serve requests with "
            "feature_logging.enabled: true (the default) first, e.g. `home-mixer serve mixer start` and "
            "POST /v1/home-timeline, or train from the offline training set (`home-mixer train` without "
            "--from-logged).")

    def col(name: str) -> list[str]:
        key = name.encode()
        return [_text(f.get(key, f.get(name, b""))) for _, f in entries]

    feats = decode_features([f.get(b"features", f.get("features", b"")) for _, f in entries],
                            [f.get(b"schema", f.get("schema", b"")) for _, f in entries])
    out = pd.DataFrame({
        "stream_id": [_text(i) for i, _ in entries],
        "serve_request_id": col("request_id"),
        "user_id": np.array(col("user_id"), dtype=np.int64),
        "post_id": np.array(col("post_id"), dtype=np.int64),
        "author_id": np.array(col("author_id"), dtype=np.int64),
        "surface": pd.to_numeric(pd.Series(col("surface")).replace("", np.nan)).astype("float64"),
        "as_of": _epoch_us(col("as_of")),
        "served_at": _epoch_us(col("served_at")),
        "light_ranker_version": col("light_ranker_version"),
        "heavy_ranker_version": col("heavy_ranker_version"),
    })
    return pd.concat([out, pd.DataFrame(feats, columns=list(ALL_FEATURES))], axis=1)


def first_impressions(serves: pd.DataFrame, impressions: pd.DataFrame, window_s: float = DEFAULT_LABEL_WINDOW_S,
                      columns=HEADS) -> pd.DataFrame:
    """The as-of join behind every label: each serve's first impression of its (user, post) in the window.

    Shared by the logged-feature training set (``join_engagement_labels``) and the drift monitor's
    production sample (``monitoring.production.label_production_sample``), so both label a serve
    the same way.

    Args:
        serves: ``user_id``, ``post_id`` (integers) and ``as_of`` (the request clock, UTC datetime);
            other columns are ignored; any index.
        impressions: canonical impressions: ``user_id``, ``post_id``, ``event_ts`` (UTC datetime)
            and ``columns``.
        window_s: an impression labels a serve at ``as_of`` when ``as_of <= event_ts < as_of +
            window_s`` (seconds, > 0); of several, the first one.
        columns: impression columns to carry (e.g. the ``HEADS`` labels, ``date``, ``tab``).

    Returns:
        One row per serve, with ``serves``' index and order: ``event_ts`` (datetime64[ns, UTC], NaT
        when no impression is in the window) and ``columns`` (NaN there, so an integer column comes
        back as float64 when some serve is unmatched).

    Raises:
        ValueError: ``window_s`` is not positive. KeyError: a needed column is missing (names it).
    """
    if not window_s > 0:
        raise ValueError(f"the label window must be > 0 seconds, got {window_s}")
    columns = [c for c in columns if c not in ("user_id", "post_id", "event_ts")]
    needed = ["user_id", "post_id", "event_ts", *columns]
    missing = [c for c in needed if c not in impressions.columns]
    if missing:
        raise KeyError(f"impressions lack column(s) {missing} needed to label serves")
    missing = [c for c in ("user_id", "post_id", "as_of") if c not in serves.columns]
    if missing:
        raise KeyError(f"serves lack column(s) {missing} needed to look up their impressions")
    window = pd.Timedelta(seconds=window_s)
    left = serves[["user_id", "post_id", "as_of"]].copy()
    imp = impressions[needed].copy()
    for key in ("user_id", "post_id"):  # merge_asof's ``by`` keys must share a dtype
        left[key] = left[key].astype("int64")
        imp[key] = imp[key].astype("int64")
    imp["event_ts"] = pd.to_datetime(imp["event_ts"], utc=True).astype("datetime64[ns, UTC]")
    # only the (user, post) pairs that were served: keeps the as-of join small
    imp = imp.merge(left[["user_id", "post_id"]].drop_duplicates(), on=["user_id", "post_id"], how="inner")
    imp = imp.sort_values("event_ts", kind="stable")
    left["as_of"] = pd.to_datetime(left["as_of"], utc=True).astype("datetime64[ns, UTC]")
    left["_row"] = np.arange(len(left))
    left = left.sort_values("as_of", kind="stable")
    joined = pd.merge_asof(left, imp, left_on="as_of", right_on="event_ts", by=["user_id", "post_id"],
                           direction="forward", tolerance=window, allow_exact_matches=True)
    # tolerance is inclusive: keep [as_of, as_of + window)
    inside = joined["event_ts"].notna() & (joined["event_ts"] < joined["as_of"] + window)
    out = pd.DataFrame({c: joined[c].where(inside) for c in ("event_ts", *columns)})
    out = out.set_axis(joined["_row"].to_numpy()).sort_index()
    return out.set_axis(serves.index)


def join_engagement_labels(logged: pd.DataFrame, impressions: pd.DataFrame,
                           window_s: float = DEFAULT_LABEL_WINDOW_S) -> pd.DataFrame:
    """Label logged serves with the first impression of the same (user, post) after the serve.

    Args:
        logged: ``read_feature_log`` output.
        impressions: canonical impressions (``user_id``, ``post_id``, ``event_ts`` (UTC datetime),
            ``date``, ``tab`` and the ``HEADS`` labels).
        window_s: an impression labels a serve at ``as_of`` when ``as_of <= event_ts < as_of +
            window_s`` (seconds, > 0).

    Returns:
        A frame shaped like the offline training set (``pipelines.training_set``): ``user_id``,
        ``post_id``, ``author_id``, ``event_timestamp`` (the labelling impression's time, UTC),
        ``date`` (int yyyymmdd of that impression), ``tab`` (the impressions' dtype), ``request_id``
        (int64: the mixer requests numbered in serve order), ``request_ts`` (= ``as_of``, the request
        clock), ``serve_request_id`` (hex), the ``HEADS`` labels (int) and every ``ALL_FEATURES``
        column as logged; one row per labelled serve, sorted by (``event_timestamp``, ``user_id``,
        ``post_id``). Unlabelled serves are dropped.

    Raises:
        ValueError: ``window_s`` is not positive. KeyError: a needed impressions column is missing.
    """
    labels = first_impressions(logged, impressions, window_s, columns=["date", "tab", *HEADS])
    hit = labels["event_ts"].notna().to_numpy()
    joined, labels = logged[hit], labels[hit]
    out = pd.DataFrame({
        "user_id": joined["user_id"].astype("int64"), "post_id": joined["post_id"].astype("int64"),
        "author_id": joined["author_id"].astype("int64"), "event_timestamp": labels["event_ts"],
        "date": labels["date"].astype("int64"), "tab": labels["tab"].astype(impressions["tab"].dtype),
        "request_id": pd.factorize(joined["serve_request_id"])[0].astype("int64"),
        "request_ts": joined["as_of"].astype("datetime64[ns, UTC]"), "serve_request_id": joined["serve_request_id"],
    })
    for h in HEADS:
        out[h] = labels[h].astype("int64")
    for f in ALL_FEATURES:
        out[f] = joined[f].astype("float64")
    return out.sort_values(["event_timestamp", "user_id", "post_id"], kind="stable").reset_index(drop=True)


def logged_training_set(client: redis.Redis, impressions: pd.DataFrame, *,
                        window_s: float = DEFAULT_LABEL_WINDOW_S, stream: str = keys.SERVED_FEATURES) -> pd.DataFrame:
    """The training set from logged features: ``read_feature_log`` + ``join_engagement_labels``.

    Raises:
        EmptyFeatureLogError: the stream is empty, or no logged serve has an impression of the same
            (user, post) within ``window_s`` after it (the message gives the counts and the logged
            request-clock span).
        ValueError: another feature schema in the log, or a bad window.
    """
    logged = read_feature_log(client, stream)
    labelled = join_engagement_labels(logged, impressions, window_s)
    if labelled.empty:
        raise EmptyFeatureLogError(
            f"none of the {len(logged)} logged serves (request clock {logged['as_of'].min()} .. "
            f"{logged['as_of'].max()}) has an impression of the same (user, post) within {window_s:.0f} s "
            "after it in the impressions table: nothing to label. Serve with a clock inside the log's "
            "span (mixer `clock.now`) or widen the label window.")
    return labelled


__all__ = ["DEFAULT_LABEL_WINDOW_S", "EmptyFeatureLogError", "first_impressions", "join_engagement_labels",
           "logged_training_set", "read_feature_log"]
