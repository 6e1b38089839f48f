"""Light ranker: a cheap score for every candidate, used to pick the heavy ranker's top K."""

from __future__ import annotations

import numpy as np

from mixer.candidate import Candidate
from mixer.components import Scorer
from mixer.scorers.ranker_handle import RankerHandle, RankerScorer


class LightRankerScorer(RankerScorer, Scorer):
    """Sets ``Candidate.light_score`` = the light ranker's probability for ``head``.

    Args:
        handle: the registered light ranker.
        head: which output column is the score (default: the first head, e.g. "click").
        by_arm: arm name -> the model that arm serves instead (``RankerScorer``).

    Raises:
        ValueError: ``head`` is not one of the model's heads, or the model needs unknown features.
    """

    name = "light_ranker"

    role = "light ranker"

    def __init__(self, handle: RankerHandle, head: str | None = None,
                 by_arm: dict[str, RankerHandle] | None = None):
        super().__init__(handle, by_arm)
        heads = list(handle.heads)
        self.head = head or heads[0]
        if self.head not in heads:
            raise ValueError(f"light ranker has heads {heads}, not {self.head!r}")
        self.column = heads.index(self.head)

    def assign(self, candidates: list[Candidate], probs: np.ndarray) -> None:
        """``Candidate.light_score`` = column ``head`` of ``probs``."""
        for c, s in zip(candidates, probs[:, self.column].tolist()):
            c.light_score = s
