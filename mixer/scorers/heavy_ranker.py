"""Heavy ranker: one probability per engagement head for the light ranker's top K."""

from __future__ import annotations

import pandas as pd

from mixer.candidate import Candidate
from mixer.scorers.ranker_handle import RankerHandle, check_handle, predict_matrix


class HeavyRankerScorer:
    """Sets ``Candidate.heads`` = {head: probability} from the multi-task heavy ranker.

    Raises:
        ValueError: the model needs unknown features or declares no heads.
    """

    name = "heavy_ranker"

    def __init__(self, handle: RankerHandle):
        check_handle(handle, "heavy ranker")
        self.handle = handle
        self.heads = list(handle.heads)

    @property
    def version(self) -> str:
        return str(self.handle.version)

    def score(self, candidates: list[Candidate], features: pd.DataFrame) -> str | None:
        """Score in place; ``features`` row i belongs to ``candidates[i]``. Returns the scoring path
        (None when there was nothing to score)."""
        if not candidates:
            return None
        probs, path = predict_matrix(self.handle, features, "heavy ranker")
        for c, row in zip(candidates, probs.tolist()):
            c.heads = dict(zip(self.heads, row))
        return path
