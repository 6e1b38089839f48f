"""Top-K retrieval metrics of ranked lists against each user's later positives, with bootstrap
intervals over users: recall@K, hit rate@K, NDCG@K and catalogue coverage@K.

One user is one ranked list of post ids (best first, no repeats) and one set of positive post ids
(what the user went on to engage with). Users without positives are not evaluated (the caller
drops them): recall is undefined for them.

Definitions (binary relevance; as in the sequential-recommendation literature, e.g. Kang &
McAuley, SASRec, ICDM 2018, and the whole-funnel evaluation of ``../shared/DESIGN.md``):
    recall@K   = |top_K ∩ P| / |P|
    hit@K      = 1 if |top_K ∩ P| > 0 else 0
    NDCG@K     = DCG@K / IDCG@K, DCG@K = Σ_{i<K, item_i ∈ P} 1 / log2(i + 2),
                 IDCG@K = Σ_{i < min(|P|, K)} 1 / log2(i + 2)  (Järvelin & Kekäläinen, TOIS 2002)
    coverage@K = |∪_users top_K| / catalogue size
A list shorter than K counts the posts it has (a source that returns 50 posts has recall@200 equal
to its recall@50).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

DEFAULT_KS: tuple[int, ...] = (10, 20, 50, 100, 200, 500)


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"cut-offs K must be >= 1 and at least one is needed, got {ks}")
    return tuple(sorted(set(ks)))


def hit_positions(ranked: Sequence[int], positives: set[int], max_k: int) -> np.ndarray:
    """0-based ranks (int64, ascending) at which ``ranked[:max_k]`` holds a positive."""
    return np.fromiter((i for i, p in enumerate(ranked[:max_k]) if p in positives), dtype="int64")


@dataclass(frozen=True)
class PerUserMetrics:
    """Per-user values of one ranked-list family (one compared order).

    Attributes:
        ks: the cut-offs, ascending.
        recall, hit, ndcg: float64 arrays of shape (users, len(ks)).
        list_len: int64 array (users,): length of each user's list.
        top: per cut-off, the set of distinct posts in the users' top K (coverage numerator).
    """

    ks: tuple[int, ...]
    recall: np.ndarray
    hit: np.ndarray
    ndcg: np.ndarray
    list_len: np.ndarray
    top: Mapping[int, frozenset[int]]

    @property
    def users(self) -> int:
        """Number of users evaluated."""
        return int(self.recall.shape[0])


def per_user_metrics(lists: Sequence[Sequence[int]], positives: Sequence[set[int]],
                     ks: Iterable[int] = DEFAULT_KS) -> PerUserMetrics:
    """Recall@K, hit@K and NDCG@K of each user's ranked list (module docstring for the formulas).

    Args:
        lists: per user, post ids best first (no repeats; a repeat would be counted twice).
        positives: per user, the set of positive post ids (non-empty), aligned with ``lists``.
        ks: cut-offs (default ``DEFAULT_KS``).

    Returns:
        ``PerUserMetrics``.

    Raises:
        ValueError: ``lists`` and ``positives`` differ in length, a user has no positives, or a K < 1.
    """
    ks = _check_ks(ks)
    if len(lists) != len(positives):
        raise ValueError(f"{len(lists)} ranked lists but {len(positives)} positive sets: one of each per user")
    n, max_k = len(lists), ks[-1]
    discounts = 1.0 / np.log2(np.arange(max_k) + 2.0)
    cum_disc = np.cumsum(discounts)
    recall = np.zeros((n, len(ks)))
    hit = np.zeros((n, len(ks)))
    ndcg = np.zeros((n, len(ks)))
    lens = np.zeros(n, dtype="int64")
    top: dict[int, set[int]] = {k: set() for k in ks}
    karr = np.asarray(ks)
    for u, (ranked, pos) in enumerate(zip(lists, positives)):
        if not pos:
            raise ValueError(f"user #{u} has no positives: leave users without positives out of the evaluation")
        ranked = list(ranked)
        lens[u] = len(ranked)
        at = hit_positions(ranked, pos, max_k)
        # hits within each cut-off: searchsorted over the ascending hit ranks
        n_hits = np.searchsorted(at, karr, side="left")
        recall[u] = n_hits / len(pos)
        hit[u] = n_hits > 0
        dcg = np.concatenate(([0.0], np.cumsum(discounts[at])))[n_hits]
        ideal = cum_disc[np.minimum(len(pos), karr) - 1]
        ndcg[u] = dcg / ideal
        for k in ks:
            top[k].update(ranked[:k])
    return PerUserMetrics(ks, recall, hit, ndcg, lens, {k: frozenset(v) for k, v in top.items()})


def bootstrap_mean_interval(values: np.ndarray, n_boot: int = 1000, level: float = 0.95,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Means over users (axis 0) with percentile bootstrap intervals (users resampled with
    replacement, Efron & Tibshirani 1993, ch. 13).

    Args:
        values: float array (users, ...) of per-user values.
        n_boot: resamples (>= 1).
        level: interval coverage in (0, 1).
        seed: ``numpy.random.default_rng`` seed; the same seed resamples the same users, so
            intervals of different orders over the same users are paired.

    Returns:
        (mean, low, high), each of shape ``values.shape[1:]``; NaN for an empty array.

    Raises:
        ValueError: ``n_boot < 1`` or ``level`` outside (0, 1).
    """
    if n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"n_boot must be >= 1 and level in (0, 1), got {n_boot} and {level}")
    values = np.asarray(values, dtype="float64")
    if values.shape[0] == 0:
        nan = np.full(values.shape[1:], np.nan)
        return nan, nan.copy(), nan.copy()
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    # each resample as how often it draws each user (multinomial), its mean as counts @ values:
    # one matrix product instead of n_boot fancy-index copies
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype("float64")
    flat = values.reshape(n, -1)
    boots = (counts @ flat) / n
    alpha = (1 - level) / 2
    low, high = np.quantile(boots, [alpha, 1 - alpha], axis=0)
    shape = values.shape[1:]
    return flat.mean(axis=0).reshape(shape), low.reshape(shape), high.reshape(shape)


@dataclass(frozen=True)
class OrderSummary:
    """Means over users with bootstrap intervals of one compared order, per cut-off.

    Attributes:
        name: the order ("served", "popularity", "source:in_network", ...).
        users: users evaluated.
        ks: cut-offs.
        recall, hit, ndcg: {metric: [mean, low, high]} per K, as ``{K: (mean, low, high)}``.
        coverage: {K: distinct posts in the users' top K / catalogue size}.
        mean_list_len: mean length of the users' lists.
    """

    name: str
    users: int
    ks: tuple[int, ...]
    recall: dict[int, tuple[float, float, float]]
    hit: dict[int, tuple[float, float, float]]
    ndcg: dict[int, tuple[float, float, float]]
    coverage: dict[int, float]
    mean_list_len: float

    def to_dict(self) -> dict:
        """JSON-ready: cut-offs as string keys, intervals as ``[mean, low, high]``."""
        def triples(d):
            return {str(k): [float(x) for x in v] for k, v in d.items()}

        return {"name": self.name, "users": self.users, "ks": list(self.ks), "recall": triples(self.recall),
                "hit_rate": triples(self.hit), "ndcg": triples(self.ndcg),
                "coverage": {str(k): float(v) for k, v in self.coverage.items()},
                "mean_list_len": self.mean_list_len}


def summarize_order(name: str, metrics: PerUserMetrics, catalogue_size: int, n_boot: int = 1000,
                    seed: int = 0) -> OrderSummary:
    """Means and bootstrap 95 % intervals of ``metrics`` over users, plus catalogue coverage.

    Raises:
        ValueError: ``catalogue_size < 1``.
    """
    if catalogue_size < 1:
        raise ValueError(f"the catalogue must hold at least one post, got {catalogue_size}")
    stacked = np.stack([metrics.recall, metrics.hit, metrics.ndcg], axis=1)  # (users, 3, ks)
    mean, low, high = bootstrap_mean_interval(stacked, n_boot=n_boot, seed=seed)

    def per_k(i):
        return {k: (float(mean[i, j]), float(low[i, j]), float(high[i, j])) for j, k in enumerate(metrics.ks)}

    return OrderSummary(
        name=name, users=metrics.users, ks=metrics.ks, recall=per_k(0), hit=per_k(1), ndcg=per_k(2),
        coverage={k: len(metrics.top[k]) / catalogue_size for k in metrics.ks},
        mean_list_len=float(metrics.list_len.mean()) if metrics.users else 0.0,
    )


__all__ = ["DEFAULT_KS", "OrderSummary", "PerUserMetrics", "bootstrap_mean_interval", "hit_positions",
           "per_user_metrics", "summarize_order"]
