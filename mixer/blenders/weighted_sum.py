"""Weighted sum of head probabilities, weights per experiment arm."""

from __future__ import annotations

from typing import Mapping, Sequence

import pandas as pd

from mixer.candidate import Candidate, Query
from mixer.components import Scorer


class WeightedSumBlender(Scorer):
    """``score = sum_h weight[arm][h] * p_h`` (Twitter home-mixer's weighted-sum "ScoredTweets"
    model: each head's probability times a tunable weight, negative feedback with a negative
    weight; the weights are what an experiment arm varies).

    Args:
        arm_weights: arm name -> head -> weight.
        heads: heads the heavy ranker predicts; each arm may only weight these.

    Raises:
        ValueError: an arm weights a head the heavy ranker does not predict.
    """

    name = "weighted_sum"
    version = ""  # no registered model: not in model_versions

    def __init__(self, arm_weights: Mapping[str, Mapping[str, float]], heads: Sequence[str]):
        for arm, weights in arm_weights.items():
            missing = sorted(set(weights) - set(heads))
            if missing:
                raise ValueError(f"arm {arm!r} weights heads {missing} that the heavy ranker does not predict "
                                 f"(its heads: {list(heads)}); drop them from the experiment config")
        self.arm_weights = {a: dict(w) for a, w in arm_weights.items()}

    def blend(self, query: Query, candidates: list[Candidate]) -> None:
        """Set ``Candidate.score`` in place from ``Candidate.heads`` with ``query.arm``'s weights.

        Raises:
            KeyError: ``query.arm`` is not a configured arm.
        """
        if query.arm not in self.arm_weights:
            raise KeyError(f"experiment arm {query.arm!r} is not configured ({sorted(self.arm_weights)})")
        weights = self.arm_weights[query.arm]
        for c in candidates:
            c.score = sum(w * c.heads.get(h, 0.0) for h, w in weights.items())

    def score(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> None:
        """The blender as a pipeline scorer: ``blend(query, candidates)`` (``features`` unused).
        Returns None (no scoring path to report).

        Raises:
            KeyError: ``query.arm`` is not a configured arm.
        """
        self.blend(query, candidates)
        return None
