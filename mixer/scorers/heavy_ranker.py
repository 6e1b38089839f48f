"""Heavy ranker: one probability per engagement head for the light ranker's top K."""

from __future__ import annotations

import numpy as np

from mixer.candidate import Candidate
from mixer.components import Scorer
from mixer.scorers.ranker_handle import RankerHandle, RankerScorer


class HeavyRankerScorer(RankerScorer, Scorer):
    """Sets ``Candidate.heads`` = {head: probability} from the multi-task heavy ranker (the
    query's arm's own when it has one: ``RankerScorer``).

    Raises:
        ValueError: the model needs unknown features or declares no heads.
    """

    name = "heavy_ranker"

    role = "heavy ranker"

    def __init__(self, handle: RankerHandle, by_arm: dict[str, RankerHandle] | None = None):
        super().__init__(handle, by_arm)
        self.heads = list(handle.heads)

    def assign(self, candidates: list[Candidate], probs: np.ndarray) -> None:
        """``Candidate.heads`` = {head: probability} from each row of ``probs``."""
        for c, row in zip(candidates, probs.tolist()):
            c.heads = dict(zip(self.heads, row))
