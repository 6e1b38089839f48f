"""Reading the mixer's production sample (``mixer/side_effects/drift_sample.py``) back as a frame.

Stream entry ids are the Redis server's clock in milliseconds, so a time window is an ``XRANGE``
between two ids; entries older than the stream's cap are gone (the sample is a recent window by
design).

Labels join later from the impressions table (``label_production_sample``), with the same as-of
join as training from logged features (``pipelines.logged_features.first_impressions``).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core import online_layout as keys
from core.feature_log import decode_features
from core.schema import ALL_FEATURES, HEADS
from monitoring.reference import score_column
from pipelines.logged_features import DEFAULT_LABEL_WINDOW_S, first_impressions

_TEXT_FIELDS = ("request_id", "arm", "source", "light_ranker_version", "heavy_ranker_version")
_INT_FIELDS = ("user_id", "post_id", "author_id", "surface")
_FLOAT_FIELDS = ("as_of", "sampled_at", "light_score", "score")


def read_production_sample(client, since_s: float | None = None, until_s: float | None = None,
                           stream: str = keys.DRIFT_SAMPLE, batch: int = 5000) -> pd.DataFrame:
    """The sampled candidates written between ``since_s`` and ``until_s`` (epoch s, Redis clock).

    Returns:
        DataFrame, one row per sampled candidate: ``request_id``, ``user_id``, ``post_id``,
        ``author_id``, ``surface`` (as ``tab``, the training sets' name), ``arm``, ``source``,
        ``as_of``, ``sampled_at``, model versions, ``light_score``, ``score`` (blended),
        ``score_<head>`` per head and every feature of ``ALL_FEATURES`` (float64, NaN = missing).
        Empty (no rows) when nothing was sampled in the window.

    Raises:
        redis.RedisError: Redis is unreachable.
        ValueError: an entry written under another feature schema (``core.feature_log``).
    """
    lo = "-" if since_s is None else f"{int(since_s * 1000)}-0"
    hi = "+" if until_s is None else f"{int(until_s * 1000)}-99999999"
    rows, blobs, schemas = [], [], []
    while True:
        entries = client.xrange(stream, min=lo, max=hi, count=batch)
        for entry_id, fields in entries:
            f = {k.decode() if isinstance(k, bytes) else k: v for k, v in fields.items()}
            text = {k: (f[k].decode() if isinstance(f.get(k), bytes) else f.get(k, "")) for k in _TEXT_FIELDS}
            row = {**text, **{k: int(f[k]) for k in _INT_FIELDS}, **{k: float(f[k]) for k in _FLOAT_FIELDS}}
            heads = json.loads(f["heads"])
            row.update({score_column(h): float(heads.get(h, np.nan)) for h in HEADS})
            rows.append(row)
            blobs.append(f["features"])
            schemas.append(f["schema"])
        if len(entries) < batch:
            break
        last = entries[-1][0].decode() if isinstance(entries[-1][0], bytes) else entries[-1][0]
        lo = "(" + last
    if not rows:
        return pd.DataFrame(columns=[*_TEXT_FIELDS, *_INT_FIELDS, *_FLOAT_FIELDS, *(score_column(h) for h in HEADS),
                                     *ALL_FEATURES])
    frame = pd.DataFrame(rows).rename(columns={"surface": "tab"})
    features = pd.DataFrame(decode_features(blobs, schemas), columns=list(ALL_FEATURES))
    return pd.concat([frame, features], axis=1)


def label_production_sample(sample: pd.DataFrame, impressions: pd.DataFrame,
                            window_s: float = DEFAULT_LABEL_WINDOW_S) -> pd.DataFrame:
    """The sample with engagement labels: each candidate takes the ``HEADS`` labels of the first
    impression of its (user, post) in ``[as_of, as_of + window_s)``.

    A candidate with no such impression was sampled but not shown (or not yet): it has no label,
    which is not a negative, so its labels stay NaN and drift metrics leave it out.

    Args:
        sample: ``read_production_sample`` output (``user_id``, ``post_id``, ``as_of`` in epoch
            seconds of the request clock).
        impressions: the canonical impressions table (``<state>/tables/impressions``): ``user_id``,
            ``post_id``, ``event_ts`` (UTC datetime) and the ``HEADS`` labels.
        window_s: the label window in seconds (> 0).

    Returns:
        A copy of ``sample`` (same rows and order) with one float64 column per head (1.0 / 0.0,
        NaN = unlabelled) and ``labelled`` (bool: an impression was found).

    Raises:
        ValueError: ``window_s`` is not positive. KeyError: a needed column is missing (names it).
    """
    # as_of was written with 6 decimals: round to the microsecond before the datetime conversion
    us = np.round(pd.to_numeric(sample["as_of"]).to_numpy(dtype=np.float64) * 1e6).astype(np.int64)
    serves = pd.DataFrame({"user_id": sample["user_id"].to_numpy(), "post_id": sample["post_id"].to_numpy(),
                           "as_of": pd.to_datetime(us, unit="us", utc=True)})
    labels = first_impressions(serves, impressions, window_s, columns=HEADS)
    out = sample.copy()
    for h in HEADS:
        out[h] = labels[h].to_numpy(dtype=np.float64)
    out["labelled"] = labels["event_ts"].notna().to_numpy()
    return out
