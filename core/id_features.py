"""Hashed id buckets: user, post and author ids -> small ints the heavy ranker embeds.

The hashing trick (Weinberger et al. 2009, "Feature Hashing for Large Scale Multitask
Learning"): an id of any size maps to one of ``B`` buckets by a fixed hash, so the embedding
tables have a fixed size, new ids need no vocabulary update, and training and serving agree
without shipping a dictionary. Bucket 0 is reserved for "no id" (missing); hashed ids use
1..B. Which buckets the model treats as out-of-vocabulary (too rare in training to have a
trained embedding) is decided inside the model (``models.heavy_ranker``), not here.

The hash is splitmix64's finaliser (Steele, Lea & Flood 2014, "Fast splittable pseudorandom
number generators"; the constants of Java's ``SplittableRandom``), on the id XOR a per-kind salt,
so a user and a post with the same number land in unrelated buckets. Bucket counts stay below
2^24, so a bucket is exact in the float32 feature matrix.

Same code offline (training sets) and online (the mixer's feature frame).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.history_features import ATTENTION_LENGTH
from core.schema import ID_FEATURES

# feature -> (id column, bucket count B, salt). Sizes: KuaiRand-Pure has 27,285 users, 7,583
# posts and ~6,300 authors; B near the id count keeps collisions moderate while the tables stay small.
ID_BUCKETS: dict[str, tuple[str, int, int]] = {
    "id_user_bucket": ("user_id", 1 << 15, 0x5BD1E995),
    "id_post_bucket": ("post_id", 1 << 14, 0x1B873593),
    "id_author_bucket": ("author_id", 1 << 14, 0x27D4EB2F),
}
assert tuple(ID_BUCKETS) == ID_FEATURES

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= _M1
        x ^= x >> np.uint64(27)
        x *= _M2
        x ^= x >> np.uint64(31)
    return x


def id_bucket(ids, buckets: int, salt: int) -> np.ndarray:
    """Bucket of each id: ``1 + splitmix64(id ^ salt) % buckets``; 0 where the id is missing.

    Args:
        ids: int64-like array ``[N]`` (NaN / None / negative = missing; KuaiRand ids are >= 0).
        buckets: B, the number of hashed buckets (1..2^24).
        salt: per-kind constant XORed into the id.

    Returns:
        float64 ``[N]`` in ``{0, 1..B}`` (float64 so it sits in the feature frame; exact).

    Raises:
        ValueError: ``buckets`` outside 1..2^24.
    """
    if not 1 <= buckets <= 1 << 24:
        raise ValueError(f"buckets must be in 1..2^24 (exact in float32), got {buckets}")
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):  # float with NaN, or objects with None
        arr = np.asarray(pd.to_numeric(pd.Series(arr), errors="coerce"), dtype="float64")
        valid = np.isfinite(arr) & (arr >= 0)
    else:
        valid = arr >= 0
    as_int = np.where(valid, arr, 0).astype(np.int64)
    h = _splitmix64(as_int.astype(np.uint64) ^ np.uint64(salt))
    bucket = (h % np.uint64(buckets)).astype(np.int64) + 1
    return np.where(valid, bucket, 0).astype("float64")


def id_bucket_columns(user_id, post_id, author_id) -> dict[str, np.ndarray]:
    """``ID_FEATURES`` -> float64 ``[N]`` buckets for aligned id arrays (a scalar user id broadcasts).

    Args:
        user_id: one int (the mixer: one user per request) or an array ``[N]``.
        post_id, author_id: arrays ``[N]`` (-1 / NaN = unknown).
    """
    post = np.asarray(post_id)
    n = len(post)
    user = np.full(n, user_id, dtype=np.int64) if np.ndim(user_id) == 0 else np.asarray(user_id)
    values = {"user_id": user, "post_id": post, "author_id": np.asarray(author_id)}
    return {feat: id_bucket(values[col], b, salt) for feat, (col, b, salt) in ID_BUCKETS.items()}


def sequence_bucket_rows(seq_posts, seq_authors, length: int = ATTENTION_LENGTH) -> np.ndarray:
    """Hashed buckets of the newest ``length`` sequence posts and their authors, one row.

    The same hash and salts as the candidate's ``id_post_bucket`` / ``id_author_bucket``, so the
    heavy ranker embeds a sequence post with the table it embeds candidates with (DIN shares the
    item embeddings between behaviours and target; Zhou et al. KDD 2018, sec. 4.3).

    Args:
        seq_posts, seq_authors: the user action sequence, newest first, aligned (any length; the
            first ``length`` are kept; -1 = unknown author -> bucket 0).
        length: positions (``ATTENTION_LENGTH``).

    Returns:
        float64 ``[2 * length]``: post buckets then author buckets (``SEQUENCE_ID_FEATURES``
        order), 0 past the sequence's end (padding).

    Raises:
        ValueError: posts and authors differ in length.
    """
    posts = np.asarray(seq_posts, dtype=np.int64).reshape(-1)[:length]
    authors = np.asarray(seq_authors, dtype=np.int64).reshape(-1)[:length]
    if len(posts) != len(authors):
        raise ValueError(f"{len(posts)} sequence posts but {len(authors)} authors")
    out = np.zeros(2 * length)
    _, post_b, post_salt = ID_BUCKETS["id_post_bucket"]
    _, author_b, author_salt = ID_BUCKETS["id_author_bucket"]
    out[:len(posts)] = id_bucket(posts, post_b, post_salt)
    out[length:length + len(authors)] = id_bucket(authors, author_b, author_salt)
    return out

