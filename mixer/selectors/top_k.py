"""Keeps the K candidates with the highest light-ranker score (the heavy ranker's input)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mixer.candidate import Candidate, Query
from mixer.components import Selector, SelectorResult
from mixer.quality_factor import scaled


class TopKSelector(Selector):
    """Top ``k`` by ``Candidate.light_score`` (NaN last; ties keep input order); ``k`` is scaled by
    the request's quality factor (``mixer.quality_factor.scaled``).

    Raises:
        ValueError: ``k < 1``.
    """

    name = "top_k"

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"heavy ranker top K must be >= 1, got {k}")
        self.k = k

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None) -> SelectorResult:
        """The kept candidates (best first) and their feature rows (``features.iloc`` of them,
        re-indexed 0..k-1: the one copy the heavy ranker's input needs).

        Raises:
            ValueError: ``features`` is None (top K feeds a scorer, it needs the frame).
        """
        if features is None:
            raise ValueError("top K selection needs the candidates' feature frame (declare it before the "
                             "selectors that drop the frame)")
        scores = np.array([c.light_score for c in candidates], dtype="float64")
        scores = np.where(np.isnan(scores), -np.inf, scores)
        order = np.argsort(-scores, kind="stable")[: scaled(self.k, query.quality_factor)]
        kept = [candidates[i] for i in order]
        rows = features.iloc[order].reset_index(drop=True)
        return SelectorResult(kept, rows)
