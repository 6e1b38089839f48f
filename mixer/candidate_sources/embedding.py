"""Out-of-network candidates from learned retrieval: the two-tower user vector against the ANN index."""

from __future__ import annotations

import numpy as np

from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource
from mixer.candidate_sources.base import source_limit


class EmbeddingCandidateSource(CandidateSource):
    """Embeds the user's action sequence (``Query.action_sequence``) with the registered two-tower
    model's user tower and returns the nearest posts of its FAISS index (``models.two_tower``,
    ``models.ann_index``; as YouTube's candidate generation, Covington et al. RecSys 2016, and Yi et
    al. RecSys 2019 for the sampling-bias-corrected towers).

    ``source_score`` = the inner product of the unit user and post vectors (cosine). The user's own
    sequence posts are left out. A user without history gets the tower's learned cold-start vector;
    while the sequence is unknown (Redis down: ``action_sequence`` None) the source returns nothing
    rather than a cold-start guess.

    The model comes with the ranker set (``mixer.pipeline.RankerSet.retrieval``), so a promoted
    version swaps in with the rankers, without a restart.

    Args:
        retrieval: a ``models.registry.TwoTowerHandle`` (``user_embeddings``, ``search``), or None
            when no two-tower model is registered (the source is then disabled).
        max_candidates: posts returned (best first).
        timeout_ms: the runner's deadline for this source.

    Raises:
        ValueError: ``max_candidates`` < 1.
    """

    def __init__(self, retrieval, max_candidates: int = 300, timeout_ms: float = 50, name: str = "embedding", *,
                 enabled: bool = True):
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.retrieval = retrieval
        self.max_candidates = max_candidates
        self.timeout_ms = timeout_ms
        self.name = name
        self._enabled = enabled

    @property
    def served_model(self) -> str:
        """The registered model this source serves (a key of the pipeline's ``model_versions``)."""
        return "two_tower"

    @property
    def version(self) -> str:
        """The two-tower version served ("" when none)."""
        return "" if self.retrieval is None else str(self.retrieval.version)

    def enabled(self, query: Query) -> bool:
        """The config switch, and a registered model to serve."""
        return self._enabled and self.retrieval is not None

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score (cosine), best first.

        Raises:
            ValueError: the model rejects the sequence (non-integer ids).
        """
        sequence = query.action_sequence
        if sequence is None:
            return []
        vector = query.user_embedding  # hydrated once per request; computed here when it was not
        vector = self.retrieval.user_embeddings([list(sequence)]) if vector is None else vector[None, :]
        limit = source_limit(self, query)
        ids, scores = self.retrieval.search(vector, limit + len(sequence))
        ids, scores = ids[0], scores[0]
        keep = (ids >= 0) & ~np.isin(ids, np.fromiter((a.post_id for a in sequence), dtype="int64",
                                                       count=len(sequence)))
        return [Candidate(post_id=int(p), source=self.name, source_score=float(s))
                for p, s in zip(ids[keep][:limit], scores[keep][:limit])]
