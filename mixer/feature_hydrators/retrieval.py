"""Retrieval scores at request time: each candidate against the two-tower user vector."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.schema import RETRIEVAL_FEATURES
from mixer.candidate import Candidate, Query
from mixer.components import FeatureHydrator
from mixer.feature_hydrators.frame import set_feature_columns


class RetrievalScoreFeatureHydrator(FeatureHydrator):
    """Sets ``retrieval_two_tower_score`` (``core.schema.RETRIEVAL_FEATURES``): the cosine of the
    user vector of ``Query.action_sequence`` and each candidate's registered candidate embedding
    (the two-tower model served with the rankers: ``RankerSet.retrieval``), whatever source found
    the candidate. This is the "two-tower dot product" history feature of the ranking stage
    (Covington et al. 2016 feed their retrieval scores to the ranker the same way).

    A post outside the registered catalogue (created after the model's index build) is embedded on
    the fly by the candidate tower from its author, primary tag and content features (the tower's
    shared row stands in for its unknown id, as training's id dropout taught it). A request whose
    sequence is unknown keeps NaN. Without a model the hydrator is off.

    Args:
        retrieval: a ``models.registry.TwoTowerHandle`` (``user_embeddings``, ``item_ids``,
            ``item_vectors``) or None.
        enabled: the config switch (``candidate_sources.embedding.enabled``).
    """

    name = "retrieval"
    stage = "retrieval_features"

    def __init__(self, retrieval, *, enabled: bool = True):
        self.retrieval = retrieval
        self._enabled = enabled
        if retrieval is not None:  # post id -> row of the candidate embeddings, once per served version
            ids = np.asarray(retrieval.item_ids, dtype=np.int64)
            self._order = np.argsort(ids, kind="stable")
            self._sorted = ids[self._order]

    def enabled(self, query: Query) -> bool:
        """The config switch, and a model to serve."""
        return self._enabled and self.retrieval is not None

    def _rows(self, post_ids: np.ndarray) -> np.ndarray:
        """Row of each post in ``item_vectors`` (-1 when not in the catalogue)."""
        pos = np.searchsorted(self._sorted, post_ids)
        pos = np.minimum(pos, len(self._sorted) - 1)
        found = self._sorted[pos] == post_ids if len(self._sorted) else np.zeros(len(post_ids), bool)
        return np.where(found, self._order[pos], -1)

    def hydrate(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None) -> pd.DataFrame:
        """``features`` with the retrieval column set (row i = candidate i).

        Raises:
            RuntimeError: the query's sequence is unknown (its read failed): the stage is degraded
                and the column stays NaN.
            ValueError: ``features`` is None or of another length than ``candidates``.
        """
        if features is None or len(features) != len(candidates):
            raise ValueError("the retrieval hydrator refines the frame of the feature hydrator declared before it")
        if query.action_sequence is None:
            raise RuntimeError("no user action sequence (its read failed): retrieval scores left missing")
        user = query.user_embedding  # hydrated once per request; computed here when it was not
        if user is None:
            user = self.retrieval.user_embeddings([list(query.action_sequence)])[0]
        rows = self._rows(np.fromiter((c.post_id for c in candidates), dtype=np.int64, count=len(candidates)))
        score = np.full(len(candidates), np.nan)
        hit = rows >= 0
        score[hit] = np.asarray(self.retrieval.item_vectors, dtype=np.float32)[rows[hit]] @ user
        new = np.flatnonzero(~hit)
        tower = getattr(self.retrieval, "model", None)
        if len(new) and tower is not None:
            score[new] = tower.item_embeddings(_item_rows(candidates, features, new))[1] @ user
        return set_feature_columns(features, {RETRIEVAL_FEATURES[0]: score})


def _item_rows(candidates: list[Candidate], features: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """The candidate tower's inputs (``models.two_tower.ITEM_COLUMNS``) of ``candidates[rows]``,
    from the candidates (author, primary tag) and the hydrated content features (duration, ad flag;
    NaN duration and an unknown type where the store has none)."""
    duration = features["post_duration_ms"].to_numpy(dtype="float64")[rows]
    is_ad = features["post_is_ad"].to_numpy(dtype="float64")[rows]
    return pd.DataFrame({
        "post_id": [candidates[i].post_id for i in rows],
        "author_id": [candidates[i].author_id for i in rows],
        "primary_tag": [candidates[i].tag_id for i in rows],
        "duration_ms": duration,
        "video_type": np.where(np.isnan(is_ad), None, np.where(is_ad > 0, "AD", "NORMAL")),
    })
