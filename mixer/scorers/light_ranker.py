"""Light ranker: a cheap score for every candidate, used to pick the heavy ranker's top K."""

from __future__ import annotations

import pandas as pd

from mixer.candidate import Candidate
from mixer.scorers.ranker_handle import RankerHandle, check_handle, predict_matrix


class LightRankerScorer:
    """Sets ``Candidate.light_score`` = the light ranker's probability for ``head``.

    Args:
        handle: the registered light ranker.
        head: which output column is the score (default: the first head, e.g. "click").

    Raises:
        ValueError: ``head`` is not one of the model's heads, or the model needs unknown features.
    """

    name = "light_ranker"

    def __init__(self, handle: RankerHandle, head: str | None = None):
        check_handle(handle, "light ranker")
        heads = list(handle.heads)
        self.head = head or heads[0]
        if self.head not in heads:
            raise ValueError(f"light ranker has heads {heads}, not {self.head!r}")
        self.column = heads.index(self.head)
        self.handle = handle

    @property
    def version(self) -> str:
        return str(self.handle.version)

    def score(self, candidates: list[Candidate], features: pd.DataFrame) -> str | None:
        """Score in place; ``features`` row i belongs to ``candidates[i]``. Returns the scoring path
        (None when there was nothing to score)."""
        if not candidates:
            return None
        probs, path = predict_matrix(self.handle, features, "light ranker")
        for c, s in zip(candidates, probs[:, self.column].tolist()):
            c.light_score = s
        return path
