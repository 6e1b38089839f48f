"""The encoding of a feature-log entry: what the mixer logs per served candidate (feature logging).

The mixer's ``FeatureLogSideEffect`` writes one entry per served item to the capped stream
``core.online_layout.SERVED_FEATURES``; ``pipelines.logged_features`` reads it back as a training
set. Both use this module, so they cannot disagree on the encoding.

Entry fields (Redis stream fields; str values as UTF-8 bytes):

    request_id            hex id of the mixer request (``Query.request_id``)
    user_id, post_id,
    author_id             decimal int64
    surface               the request's surface (KuaiRand ``tab``) as a decimal int
    as_of                 the request clock (``Query.now_s``), epoch seconds UTC, "%.6f"
    served_at             wall-clock time of the log write, epoch seconds UTC, "%.3f"
    light_ranker_version,
    heavy_ranker_version  registered model versions ("" if none)
    schema                ``FEATURE_SCHEMA_ID``: a fingerprint of the feature names and order
    features              ``len(ALL_FEATURES)`` float64 values, little-endian IEEE-754, in
                          ``core.schema.ALL_FEATURES`` order, concatenated (8 bytes each; NaN =
                          missing): the hydrated frame row exactly as the rankers saw it.

float64, not float32: the logged row must equal the training-set row to 1e-9 relative (the
train/serve equality test), and float32 keeps about 7 digits. With the current schema an entry's
``features`` value is ``8 * len(ALL_FEATURES)`` bytes.
"""

from __future__ import annotations

import hashlib

import numpy as np

from core.schema import ALL_FEATURES

FEATURE_DTYPE = np.dtype("<f8")
FEATURE_SCHEMA_ID = hashlib.sha1(",".join(ALL_FEATURES).encode()).hexdigest()[:12]
def encode_rows(rows: np.ndarray) -> list[bytes]:
    """Feature rows -> one ``features`` field value per row (the writer's path: one check per page).

    Args:
        rows: float values in ``ALL_FEATURES`` order, shape ``[N, len(ALL_FEATURES)]`` (any float
            dtype; converted to little-endian float64).

    Raises:
        ValueError: the rows have another width.
    """
    arr = np.asarray(rows, dtype=FEATURE_DTYPE)
    if arr.ndim != 2 or arr.shape[1] != len(ALL_FEATURES):
        raise ValueError(f"a feature row has {len(ALL_FEATURES)} values (ALL_FEATURES), got shape {arr.shape}")
    return [row.tobytes() for row in arr]


def encode_features(row: np.ndarray) -> bytes:
    """One feature row ``[len(ALL_FEATURES)]`` -> the ``features`` field value (see :func:`encode_rows`).

    Raises:
        ValueError: the row has another length.
    """
    arr = np.asarray(row, dtype=FEATURE_DTYPE)
    if arr.shape != (len(ALL_FEATURES),):
        raise ValueError(f"a feature row has {len(ALL_FEATURES)} values (ALL_FEATURES), got shape {arr.shape}")
    return encode_rows(arr[None, :])[0]


def decode_features(values: list[bytes], schema_ids: list[bytes | str] | None = None) -> np.ndarray:
    """``features`` field values -> a float64 matrix ``[len(values), len(ALL_FEATURES)]``.

    Args:
        values: the raw ``features`` bytes of each entry.
        schema_ids: the entries' ``schema`` fields, checked against ``FEATURE_SCHEMA_ID`` if given.

    Raises:
        ValueError: an entry was logged with another feature schema (names or order changed since:
            its columns would be misread), or a value has the wrong length.
    """
    if schema_ids is not None:
        bad = {s.decode() if isinstance(s, bytes) else str(s) for s in schema_ids} - {FEATURE_SCHEMA_ID}
        if bad:
            raise ValueError(f"feature-log entries were written with feature schema(s) {sorted(bad)}, this code reads "
                             f"{FEATURE_SCHEMA_ID} (core.schema.ALL_FEATURES changed): train from entries logged "
                             "by the current version")
    width = FEATURE_DTYPE.itemsize * len(ALL_FEATURES)
    wrong = [i for i, v in enumerate(values) if len(v) != width]
    if wrong:
        raise ValueError(f"feature-log entry {wrong[0]} has {len(values[wrong[0]])} bytes of features, expected {width}")
    if not values:
        return np.empty((0, len(ALL_FEATURES)), dtype=np.float64)
    return np.frombuffer(b"".join(values), dtype=FEATURE_DTYPE).reshape(len(values), len(ALL_FEATURES)).astype(
        np.float64)


__all__ = ["FEATURE_DTYPE", "FEATURE_SCHEMA_ID", "decode_features", "encode_features", "encode_rows"]
