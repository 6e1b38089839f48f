"""History features: how a candidate relates to the user's action sequence, the same code offline
(training sets, ``pipelines.history_features``) and online (``mixer.feature_hydrators.history``).

Inputs of one request: the user's engaged posts before the request (newest first, at most
``SEQUENCE_LENGTH``), their authors and primary tags, and the co-engagement neighbour lists of the
newest ``SEED_POSTS`` of them (``pipelines.coengagement``, as of the last index build). Per candidate:

    hist_coeng_sum    Σ_seeds sim(seed, candidate)   (item-based CF score; Sarwar et al. WWW 2001;
                                                      the-algorithm's UTEG scores by the same idea)
    hist_coeng_max    max_seeds sim(seed, candidate)
    hist_coeng_seeds  seeds whose neighbour list holds the candidate
    hist_author_engagements  sequence posts by the candidate's author (DIN's "same shop" signal,
                             Zhou et al. KDD 2018, here as a count)
    hist_tag_engagements     sequence posts with the candidate's primary tag
    hist_len          sequence length (the user's history depth: 0 = cold start)

A user without history gets zeros (not NaN: "no overlap" is a value, and the rankers should learn
what an empty history means).

The sequence itself also reaches the heavy ranker, for target attention over it (DIN, Zhou et al.
KDD 2018): ``SEQUENCE_ID_FEATURES`` are the hashed post and author buckets of the newest
``ATTENTION_LENGTH`` sequence posts (``core.id_features.sequence_bucket_columns``), the same value
in every candidate row of a request, 0 where the sequence is shorter (padding). They are columns
of the feature frame like the candidate's own id buckets, so every serving path (in-process,
ONNX/Triton, BentoML) and the feature log carry them without a second input tensor.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

HISTORY_FEATURES: tuple[str, ...] = (
    "hist_coeng_sum", "hist_coeng_max", "hist_coeng_seeds", "hist_author_engagements", "hist_tag_engagements",
    "hist_len",
)
SEQUENCE_LENGTH = 64  # engaged posts per user in the online store (issue #19's N)
SEED_POSTS = 32       # newest engagements expanded through co-engagement (recall@200 flat from 20 to 64)
# Sequence posts the heavy ranker attends over. DIN's behaviour sequences are of this order (its
# Amazon data averages ~10 behaviours); each position costs two frame columns per candidate row.
ATTENTION_LENGTH = 16
SEQUENCE_POST_FEATURES: tuple[str, ...] = tuple(f"seq_post_bucket_{i:02d}" for i in range(ATTENTION_LENGTH))
SEQUENCE_AUTHOR_FEATURES: tuple[str, ...] = tuple(f"seq_author_bucket_{i:02d}" for i in range(ATTENTION_LENGTH))
SEQUENCE_ID_FEATURES: tuple[str, ...] = SEQUENCE_POST_FEATURES + SEQUENCE_AUTHOR_FEATURES

NeighbourList = tuple[np.ndarray, np.ndarray]  # (neighbour post ids int64, similarities float64), best first


def coengagement_scores(seed_lists: Sequence[NeighbourList]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Aggregate the seeds' neighbour lists per neighbour.

    Args:
        seed_lists: one (ids, sims) pair per seed.

    Returns:
        (post ids int64 ascending, sum float64, max float64, seeds holding it int64), aligned.
    """
    lists = [(np.asarray(i, dtype="int64"), np.asarray(s, dtype="float64")) for i, s in seed_lists if len(i)]
    if not lists:
        empty_i = np.zeros(0, dtype="int64")
        empty_f = np.zeros(0, dtype="float64")
        return empty_i, empty_f, empty_f.copy(), empty_i.copy()
    ids = np.concatenate([i for i, _ in lists])
    sims = np.concatenate([s for _, s in lists])
    uniq, inv = np.unique(ids, return_inverse=True)
    total = np.bincount(inv, weights=sims, minlength=len(uniq))
    best = np.full(len(uniq), -np.inf)
    np.maximum.at(best, inv, sims)
    count = np.bincount(inv, minlength=len(uniq)).astype("int64")
    return uniq, total, best, count


def history_feature_columns(seq_authors: Sequence[int], seq_tags: Sequence[int],
                            seed_lists: Sequence[NeighbourList], cand_posts: Sequence[int],
                            cand_authors: Sequence[int], cand_tags: Sequence[int]) -> dict[str, np.ndarray]:
    """The ``HISTORY_FEATURES`` of one request's candidates (module docstring).

    Args:
        seq_authors, seq_tags: authors and primary tags of the user's sequence posts (-1 unknown:
            never matches).
        seed_lists: neighbour lists of the seed posts.
        cand_posts, cand_authors, cand_tags: the candidates' ids, aligned (length n).

    Returns:
        feature name -> float64 array of length n.

    Raises:
        ValueError: the candidate arrays differ in length.
    """
    posts = np.asarray(cand_posts, dtype="int64").reshape(-1)
    authors = np.asarray(cand_authors, dtype="int64").reshape(-1)
    tags = np.asarray(cand_tags, dtype="int64").reshape(-1)
    n = len(posts)
    if len(authors) != n or len(tags) != n:
        raise ValueError(f"{n} candidate posts but {len(authors)} authors and {len(tags)} tags")
    ids, total, best, count = coengagement_scores(seed_lists)
    coeng_sum, coeng_max, coeng_seeds = np.zeros(n), np.zeros(n), np.zeros(n)
    if len(ids):
        at = np.searchsorted(ids, posts)
        at = np.minimum(at, len(ids) - 1)
        hit = ids[at] == posts
        coeng_sum[hit], coeng_max[hit], coeng_seeds[hit] = total[at[hit]], best[at[hit]], count[at[hit]]

    def counts(seq: Sequence[int], cand: np.ndarray) -> np.ndarray:
        seq = np.asarray(seq, dtype="int64").reshape(-1)
        seq = seq[seq >= 0]
        if not len(seq):
            return np.zeros(n)
        values, freq = np.unique(seq, return_counts=True)
        at = np.minimum(np.searchsorted(values, cand), len(values) - 1)
        return np.where((values[at] == cand) & (cand >= 0), freq[at], 0).astype("float64")

    return {
        "hist_coeng_sum": coeng_sum,
        "hist_coeng_max": coeng_max,
        "hist_coeng_seeds": coeng_seeds,
        "hist_author_engagements": counts(seq_authors, authors),
        "hist_tag_engagements": counts(seq_tags, tags),
        "hist_len": np.full(n, float(len(seq_authors))),
    }


__all__ = ["ATTENTION_LENGTH", "HISTORY_FEATURES", "NeighbourList", "SEED_POSTS", "SEQUENCE_AUTHOR_FEATURES",
           "SEQUENCE_ID_FEATURES", "SEQUENCE_LENGTH", "SEQUENCE_POST_FEATURES", "coengagement_scores",
           "history_feature_columns"]
