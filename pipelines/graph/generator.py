"""A synthetic directed follow graph with Twitter's in-degree (followers) distribution.

Model (Chung-Lu, directed): user ``i`` gets a popularity weight ``w_i`` drawn from a Pareto
distribution whose density falls as ``w^-alpha``; every follow edge picks its followee with
probability ``w_i / sum(w)``, so the expected followers of ``i`` are proportional to ``w_i`` and the
in-degree distribution has the same power-law tail ``P(k) ~ k^-alpha``.

Source of the exponent: Kwak, Lee, Park, Moon, "What is Twitter, a social network or a news
media?", WWW 2010 (41.7M users, 1.47G follow edges, crawled 2009): the distribution of followers
fits a power law with exponent **2.276** up to about 10^5 followers, and the accounts beyond that
have many more followers than the power law predicts. That heavier **celebrity tail** is added
explicitly: ``celebrities`` accounts (default one per 100,000 users) get a follower count drawn
log-uniformly between ``celebrity_min_share`` and ``celebrity_max_share`` of all users (defaults 1 %
and 10 %; Kwak's knee, 10^5 of 41.7M users, is 0.24 %). Myers, Sharma, Gupta, Lin, "Information
network or social network? The structure of the Twitter follow graph", WWW 2014, describe the
same heavy-tailed, low-reciprocity shape on the 2012 graph. Reciprocity and communities are not
modelled: fan-out cost depends on the in-degree distribution, which is.

Out-degree (followees per user): geometric with mean ``mean_followees`` (most users follow few
accounts, a few follow many), capped at ``MAX_FOLLOWEES`` (Twitter's follow limit, 5,000 without
the ratio rule). Duplicate edges and self-follows are dropped, so the realised mean is a little
below ``mean_followees`` (reported in ``FollowGraph.mean_followees``).

Cost: 1,000,000 users x 30 followees (~30M edges) takes ~10-20 s and ~1.5 GB peak (int64 arrays).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KWAK_FOLLOWER_EXPONENT = 2.276  # Kwak et al. WWW 2010, followers (in-degree) power law below 10^5
MAX_FOLLOWEES = 5_000


@dataclass(frozen=True)
class FollowGraph:
    """A follow graph: edge ``follower[i] -> followee[i]`` (int64 arrays, sorted by follower then
    followee, no duplicates or self-loops) over user ids ``0 .. n_users - 1``."""

    follower: np.ndarray
    followee: np.ndarray
    n_users: int
    seed: int
    alpha: float

    @property
    def n_edges(self) -> int:
        return int(self.follower.size)

    @property
    def mean_followees(self) -> float:
        return self.n_edges / max(self.n_users, 1)

    def in_degree(self) -> np.ndarray:
        """Followers per user (int64, length ``n_users``)."""
        return np.bincount(self.followee, minlength=self.n_users)

    def out_degree(self) -> np.ndarray:
        """Followees per user (int64, length ``n_users``)."""
        return np.bincount(self.follower, minlength=self.n_users)

    def describe(self) -> str:
        """One line: users, edges, mean followees, max / p99 / median followers."""
        ind = self.in_degree()
        return (f"{self.n_users:,} users, {self.n_edges:,} edges (mean {self.mean_followees:.1f} followees); "
                f"followers max {int(ind.max()) if ind.size else 0:,}, "
                f"p99 {float(np.percentile(ind, 99)) if ind.size else 0:.0f}, "
                f"median {float(np.median(ind)) if ind.size else 0:.0f}; seed {self.seed}, alpha {self.alpha}")


def generate_follow_graph(users: int, mean_followees: float, seed: int = 0, *,
                          alpha: float = KWAK_FOLLOWER_EXPONENT, celebrities: int | None = None,
                          celebrity_min_share: float = 0.01, celebrity_max_share: float = 0.10,
                          chunk_edges: int = 5_000_000) -> FollowGraph:
    """Generate the graph (module docstring); the same arguments give the same graph.

    Args:
        users: number of users N (>= 2).
        mean_followees: target mean out-degree (> 0, < N).
        seed: seed of numpy's PCG64 generator.
        alpha: power-law exponent of the in-degree density (> 2, so the mean is finite).
        celebrities: accounts of the explicit celebrity tail (default ``N // 100_000``).
        celebrity_min_share, celebrity_max_share: their followers as a share of N (0 < min <= max <= 1).
        chunk_edges: edges sampled per step (bounds the temporary memory).

    Raises:
        ValueError: an argument out of range (the message names it).
    """
    if users < 2:
        raise ValueError(f"users must be >= 2, got {users}")
    if not 0 < mean_followees < users:
        raise ValueError(f"mean_followees must be in (0, users), got {mean_followees}")
    if alpha <= 2:
        raise ValueError(f"alpha must be > 2 (a finite mean in-degree), got {alpha}")
    if not 0 < celebrity_min_share <= celebrity_max_share <= 1:
        raise ValueError("need 0 < celebrity_min_share <= celebrity_max_share <= 1")
    rng = np.random.default_rng(seed)
    n = int(users)
    # Pareto(x_min=1) weights with density ~ w^-alpha: inverse CDF of 1 - U
    weights = (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))
    out_deg = np.minimum(rng.geometric(1.0 / mean_followees, size=n), min(MAX_FOLLOWEES, n - 1))
    n_edges = int(out_deg.sum())
    n_celeb = n // 100_000 if celebrities is None else int(celebrities)
    if n_celeb:
        # the celebrity tail: weights giving each its drawn share of users as expected followers
        celeb = rng.choice(n, size=min(n_celeb, n), replace=False)
        share = np.exp(rng.uniform(math.log(celebrity_min_share), math.log(celebrity_max_share), size=celeb.size))
        weights[celeb] = 0.0
        rest = weights.sum()
        target = share * n  # expected followers
        # w_c / (rest + sum w_c) * E = target_c  =>  w_c = target_c * (rest + W) / E, W = sum w_c
        frac = target / n_edges
        total = rest / (1.0 - min(frac.sum(), 0.9))
        weights[celeb] = frac * total
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    follower = np.repeat(np.arange(n, dtype=np.int64), out_deg)
    followee = np.empty(n_edges, dtype=np.int64)
    for start in range(0, n_edges, chunk_edges):
        stop = min(start + chunk_edges, n_edges)
        followee[start:stop] = np.searchsorted(cdf, rng.random(stop - start), side="right")
    np.minimum(followee, n - 1, out=followee)  # float rounding at the last bin
    # drop self-follows and duplicates: one int64 key per edge, unique sorts by follower then followee
    key = np.sort(follower * n + followee)
    keep = np.empty(key.size, dtype=bool)
    keep[:1] = True
    np.not_equal(key[1:], key[:-1], out=keep[1:])  # np.sort + diff: numpy 2's np.unique hashes, ~10x slower here
    keep &= (key // n) != (key % n)
    key = key[keep]
    del follower, followee
    return FollowGraph(follower=key // n, followee=key % n, n_users=n, seed=seed, alpha=alpha)


def fit_power_law_exponent(degrees: np.ndarray, k_min: int, k_max: float = math.inf) -> float:
    """Maximum-likelihood exponent of a discrete power law over degrees in ``[k_min, k_max]``
    (Clauset, Shalizi, Newman, SIAM Review 2009, eq. 3.7: ``1 + n / sum(ln(k / (k_min - 1/2)))``).

    Raises:
        ValueError: fewer than 10 degrees in the range.
    """
    k = np.asarray(degrees, dtype=np.float64)
    k = k[(k >= k_min) & (k <= k_max)]
    if k.size < 10:
        raise ValueError(f"only {k.size} degrees in [{k_min}, {k_max}]: too few to fit")
    return 1.0 + k.size / float(np.log(k / (k_min - 0.5)).sum())
