"""Weighted sum of head probabilities, weights per experiment arm."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd

from mixer.candidate import Candidate, Query
from mixer.components import Scorer


# the light score's floor in the product: a zero probability must not erase the heads' ordering
LIGHT_SCORE_FLOOR = 1e-6


class WeightedSumBlender(Scorer):
    """``score = light_score ** e[arm] * sum_h weight[arm][h] * p_h`` (for a non-negative sum).

    The sum is Twitter home-mixer's weighted-sum "ScoredTweets" model: each head's probability
    times a tunable weight, negative feedback with a negative weight; the weights are what an
    experiment arm varies. The heavy ranker's heads are probabilities *given the post is shown*;
    a light ranker trained on the mixer's candidate sets (``home_mixer.candidate_training``)
    estimates the probability that the user engages with the candidate at all. With exponent
    ``e = 1`` the score is their product, as ESMM's pCTCVR = pCTR x pCVR (Ma et al., SIGIR 2018)
    chains a whole-space estimate with a conditional one; ``e = 0`` is the plain weighted sum.
    The light score is floored at ``LIGHT_SCORE_FLOOR``; a candidate without one (NaN) keeps the sum.
    A negative sum is divided by the factor instead, so a likelier post never ranks lower than a
    less likely one of the same sum (as ``AuthorDiversitySelector`` treats negative scores).

    An interleaving arm (``interleaving``: arm -> its two team arms) gets both teams' scores in
    ``Candidate.team_scores`` and the first team's as ``score``
    (``mixer.selectors.InterleavingSelector`` merges the two rankings).

    Args:
        arm_weights: arm name -> head -> weight.
        heads: heads the heavy ranker predicts; each arm may only weight these.
        light_exponents: arm name -> exponent ``e`` (missing arms: 0).
        interleaving: interleaving arm -> (team arm A, team arm B), both in ``arm_weights``.

    Raises:
        ValueError: an arm weights a head the heavy ranker does not predict; an exponent is negative.
    """

    name = "weighted_sum"
    version = ""  # no registered model: not in model_versions

    def __init__(self, arm_weights: Mapping[str, Mapping[str, float]], heads: Sequence[str],
                 light_exponents: Mapping[str, float] | None = None,
                 interleaving: Mapping[str, tuple[str, str]] | None = None):
        exponents = dict(light_exponents or {})
        bad = {a: e for a, e in exponents.items() if not (e >= 0.0 and math.isfinite(e))}
        if bad:
            raise ValueError(f"light score exponents must be finite and >= 0, got {bad}")
        self.light_exponents = {a: float(exponents.get(a, 0.0)) for a in arm_weights}
        for arm, weights in arm_weights.items():
            missing = sorted(set(weights) - set(heads))
            if missing:
                raise ValueError(f"arm {arm!r} weights heads {missing} that the heavy ranker does not predict "
                                 f"(its heads: {list(heads)}); drop them from the experiment config")
        self.arm_weights = {a: dict(w) for a, w in arm_weights.items()}
        self.interleaving = {a: tuple(t) for a, t in (interleaving or {}).items()}
        unknown = sorted({t for teams in self.interleaving.values() for t in teams} - set(self.arm_weights))
        if unknown:
            raise ValueError(f"interleaved arms {unknown} have no weights")

    def blend(self, query: Query, candidates: list[Candidate]) -> None:
        """Set ``Candidate.score`` in place from ``Candidate.heads`` with ``query.arm``'s weights.

        Raises:
            KeyError: ``query.arm`` is not a configured arm.
        """
        teams = self.interleaving.get(query.arm)
        if teams is not None:
            for c in candidates:
                c.team_scores = {t: self._score(t, c) for t in teams}
                c.score = c.team_scores[teams[0]]
            return
        if query.arm not in self.arm_weights:
            raise KeyError(f"experiment arm {query.arm!r} is not configured ({sorted(self.arm_weights)})")
        for c in candidates:
            c.score = self._score(query.arm, c)

    def _score(self, arm: str, c: Candidate) -> float:
        score = sum(w * c.heads.get(h, 0.0) for h, w in self.arm_weights[arm].items())
        e = self.light_exponents[arm]
        if e and not math.isnan(c.light_score):
            factor = max(c.light_score, LIGHT_SCORE_FLOOR) ** e
            # a negative sum (negative feedback outweighs) is divided: likelier posts stay higher
            score = score * factor if score >= 0 else score / factor
        return score

    def score(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> None:
        """The blender as a pipeline scorer: ``blend(query, candidates)`` (``features`` unused).
        Returns None (no scoring path to report).

        Raises:
            KeyError: ``query.arm`` is not a configured arm.
        """
        self.blend(query, candidates)
        return None
