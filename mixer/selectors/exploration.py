"""Exploration with known propensities: the page's slots are drawn at random from the best
candidates, and each served post carries the probability it had of being drawn, so later
policies can be evaluated off-policy (``models.ope``) from what this one served.

Two policies, chosen per experiment arm (``experiment.arms[].exploration``):

- ``softmax`` (Plackett-Luce sampling): slot 1 takes candidate ``a`` of the pool with probability
  ``exp(s_a / T) / sum_b exp(s_b / T)`` over the blended scores ``s``; slot 2 draws the same way
  from what is left, and so on. Each slot's propensity is that conditional probability: the
  decision is one slot given the slots above it, the unit ``models.ope`` works with.
- ``epsilon_greedy``: each slot takes the best remaining candidate, except with probability
  ``epsilon`` a uniformly drawn remaining one; the propensity is ``1 - epsilon + epsilon / n`` for
  the best one and ``epsilon / n`` otherwise (``n`` = candidates left in the pool).

The draw is seeded by the request id, so one request always gives one page (a retried request
shows what the log says it showed). Sources: Li, Chu, Langford & Schapire 2010 (epsilon-greedy
exploration for news recommendation, with logged propensities); Plackett 1975 / Luce 1959 for the
sampling; the x-algorithm home mixer serves deterministic pages, so this is this project's own.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np

from mixer.candidate import Candidate, Query
from mixer.components import Selector, SelectorResult

if TYPE_CHECKING:
    import pandas as pd

    from mixer.config import ExplorationSettings


def request_rng(request_id: str) -> np.random.Generator:
    """A generator seeded by the request id (blake2b, 8 bytes): the same request, the same draw."""
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big"))


def softmax_slots(scores: np.ndarray, slots: int, temperature: float,
                  rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Plackett-Luce: ``slots`` indices drawn without replacement by a softmax over ``scores``.

    Args:
        scores: (n,) float64 blended scores (NaN counts as the lowest score).
        slots: how many to draw (at most n).
        temperature: T > 0, in the scores' units.

    Returns:
        (indices in slot order, each slot's conditional probability).
    """
    s = np.where(np.isnan(scores), -np.inf, scores.astype("float64") / temperature)
    if np.isneginf(s).all():
        s = np.zeros_like(s)
    left = np.ones(len(s), dtype=bool)
    picks: list[int] = []
    probs: list[float] = []
    for _ in range(min(slots, len(s))):
        z = np.where(left, s, -np.inf)
        finite = np.isfinite(z)
        if not finite.any():  # only NaN-scored candidates left: uniform over them
            z = np.where(left, 0.0, -np.inf)
        p = np.exp(z - z[np.isfinite(z)].max())
        p /= p.sum()
        i = int(rng.choice(len(p), p=p))
        picks.append(i)
        probs.append(float(p[i]))
        left[i] = False
    return picks, probs


def epsilon_greedy_slots(slots: int, n: int, epsilon: float, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Epsilon-greedy over a pool already in best-first order (index 0 = best).

    Returns:
        (indices in slot order, each slot's conditional probability).
    """
    left = list(range(n))
    picks: list[int] = []
    probs: list[float] = []
    for _ in range(min(slots, n)):
        m = len(left)
        if rng.random() < epsilon:
            j = int(rng.integers(m))
        else:
            j = 0
        picks.append(left.pop(j))
        probs.append((1 - epsilon) * (j == 0) + epsilon / m)
    return picks, probs


class ExplorationSelector(Selector):
    """Re-draws the page's slots from the top ``pool`` candidates (not served on earlier pages)
    with the arm's exploration policy (module docstring). Each pool candidate gets its
    ``pool_index`` (0 = best in the ranked order) and each drawn one the ``propensity`` of its
    draw. Runs before ``PageSelector``, which then cuts the drawn slots as the page; the
    candidates not drawn follow in their ranked order (a page longer than the pool is filled
    from them deterministically: propensity 1).

    Args:
        by_arm: arm name -> its ``ExplorationSettings``; arms without an entry serve greedily.
    """

    name = "exploration"

    def __init__(self, by_arm: dict[str, ExplorationSettings]):
        self.by_arm = dict(by_arm)

    def enabled(self, query: Query) -> bool:
        """True when the query's arm explores."""
        return query.arm in self.by_arm

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> SelectorResult:
        """The drawn slots first, then the rest in order; no feature frame (runs after scoring)."""
        settings = self.by_arm[query.arm]
        earlier = set(query.cursor.served) if query.cursor is not None else set()
        pool = [c for c in candidates if c.post_id not in earlier][: settings.pool]
        for i, c in enumerate(pool):
            c.pool_index = i
        rng = request_rng(query.request_id)
        slots = min(query.page_size, len(pool))
        if settings.policy == "softmax":
            scores = np.array([c.score for c in pool], dtype="float64")
            picks, probs = softmax_slots(scores, slots, settings.temperature, rng)
        else:
            picks, probs = epsilon_greedy_slots(slots, len(pool), settings.epsilon, rng)
        drawn = []
        for i, p in zip(picks, probs):
            pool[i].propensity = p
            drawn.append(pool[i])
        chosen = {id(c) for c in drawn}
        return SelectorResult(drawn + [c for c in candidates if id(c) not in chosen], None)
