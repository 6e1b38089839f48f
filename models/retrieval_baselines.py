"""The baselines a retrieval change is judged against (DESIGN.md, Evaluation): a popularity list and
a simple item-to-item co-engagement recommender, both built only from data before the cutoff.

Co-engagement baseline (item-based CF over sequences; Sarwar et al. WWW 2001, Linden et al. IEEE
Internet Computing 2003): posts a user engaged at most ``window`` positions apart co-occur;

    C_ij = number of such co-occurrences (both directions), n_i = users whose sequence holds i,
    sim(i, j) = C_ij / sqrt(n_i n_j)                    (cosine over co-occurrence)
    score_u(j) = Σ_{i in the user's last ``seeds`` engagements} sim(i, j)

the user's own engaged posts excluded, then the popularity list fills what is left. It is kept
deliberately plain (no IUF weighting, no Spark, no online store) so that the served co-engagement
source (``pipelines.coengagement``) has an independent reference.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd


def cooccurrence_similarity(sequences: pd.DataFrame, window: int = 10):
    """Cosine co-occurrence similarity of posts over users' sequences (module docstring).

    Args:
        sequences: user_id, post_id, ts (``pipelines.sequences.engagement_sequences``).
        window: positions apart that still co-occur (>= 1).

    Returns:
        (``scipy.sparse.csr_matrix`` sim of shape (n, n), float64, zero diagonal; ``np.ndarray``
        of the post ids of its rows / columns, int64).

    Raises:
        ValueError: ``window < 1``.
    """
    import scipy.sparse as sp

    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    seq = sequences.sort_values(["user_id", "ts"], kind="stable")
    ids, codes = np.unique(seq["post_id"].to_numpy(dtype="int64"), return_inverse=True)
    users = seq["user_id"].to_numpy(dtype="int64")
    n = len(ids)
    rows, cols = [], []
    for d in range(1, window + 1):
        same_user = users[d:] == users[:-d]
        a, b = codes[:-d][same_user], codes[d:][same_user]
        keep = a != b
        rows += [a[keep], b[keep]]
        cols += [b[keep], a[keep]]
    r = np.concatenate(rows) if rows else np.zeros(0, dtype="int64")
    c = np.concatenate(cols) if cols else np.zeros(0, dtype="int64")
    co = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(n, n))
    per_user = pd.DataFrame({"u": users, "p": codes}).drop_duplicates()
    n_users = np.bincount(per_user["p"].to_numpy(), minlength=n).astype("float64")
    norm = sp.diags(1.0 / np.sqrt(np.maximum(n_users, 1.0)))
    return (norm @ co @ norm).tocsr(), ids


def coengagement_lists(sequences: pd.DataFrame, users: Sequence[int], fill: Sequence[int], k: int = 500,
                       window: int = 10, seeds: int = 20) -> dict[int, list[int]]:
    """Each user's top ``k`` posts by the co-engagement baseline, then the ``fill`` list.

    Args:
        sequences: the engagement sequences before the cutoff (user_id, post_id, ts).
        users: the users to recommend for.
        fill: the popularity list (best first) that fills each list to ``k``.
        k: list length.
        window: co-occurrence window.
        seeds: latest engagements scored from.

    Returns:
        user_id -> post ids, best first, no repeats, the user's engaged posts left out.
    """
    import scipy.sparse as sp

    sim, ids = cooccurrence_similarity(sequences, window)
    index = {int(p): i for i, p in enumerate(ids)}
    wanted = set(int(u) for u in users)
    seq = sequences[sequences["user_id"].isin(wanted)].sort_values(["user_id", "ts"], kind="stable")
    out: dict[int, list[int]] = {}
    by_user = {int(u): g["post_id"].to_numpy() for u, g in seq.groupby("user_id")}
    fill = [int(p) for p in fill]
    for u in users:
        u = int(u)
        history = by_user.get(u, np.zeros(0, dtype="int64"))
        engaged = set(history.tolist())
        recent = [index[p] for p in history[-seeds:].tolist() if p in index]
        ranked: list[int] = []
        if recent:
            x = sp.csr_matrix((np.ones(len(recent)), (np.zeros(len(recent), dtype="int64"), recent)),
                              shape=(1, len(ids)))
            scores = (x @ sim).toarray().ravel()
            top = np.argsort(-scores, kind="stable")[: k + len(engaged)]
            ranked = [int(ids[i]) for i in top if scores[i] > 0 and int(ids[i]) not in engaged][:k]
        chosen = set(ranked)
        for p in fill:
            if len(ranked) >= k:
                break
            if p not in chosen and p not in engaged:
                ranked.append(p)
                chosen.add(p)
        out[u] = ranked
    return out


__all__ = ["coengagement_lists", "cooccurrence_similarity"]
