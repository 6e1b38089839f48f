"""The user's two-tower vector, computed once per request for every stage that needs it."""

from __future__ import annotations

import dataclasses

from mixer.candidate import Query
from mixer.components import QueryHydrator


class UserEmbeddingQueryHydrator(QueryHydrator):
    """Puts the two-tower user vector of ``Query.action_sequence`` on the query
    (``Query.user_embedding``, float32 ``[D]``, unit length), for the embedding source's ANN search
    and the retrieval-score hydrator, which would otherwise each run the user tower (about 1 ms on
    this machine's CPU). As Twitter's home-mixer hydrates the user's SimClusters/TwHIN embeddings
    on the query once for all its candidate sources.

    Declared after ``UserActionSequenceQueryHydrator``. While the sequence is unknown (None: its
    read failed) the vector stays None and its readers skip or degrade as before.

    Where the tower runs is the handle's business (``candidate_sources.embedding.user_tower``):
    in-process for a ``TwoTowerHandle``; on Triton, falling back to in-process on error, for a
    ``mixer.query_hydrators.remote_user_tower.RemoteUserTowerHandle``.

    Args:
        retrieval: the served two-tower (``models.registry.TwoTowerHandle`` or its Triton-backed
            ``RemoteUserTowerHandle``) or None (off).
        enabled: ``candidate_sources.embedding.enabled`` and ``action_sequence.enabled``.
    """

    name = "user_embedding"

    def __init__(self, retrieval, *, enabled: bool = True):
        self.retrieval = retrieval
        self._enabled = enabled

    def enabled(self, query: Query) -> bool:
        """The config switch, a model to serve and a known sequence."""
        return self._enabled and self.retrieval is not None and query.action_sequence is not None

    def hydrate(self, query: Query) -> Query:
        """``query`` with ``user_embedding`` set.

        Raises:
            ValueError: the model rejects the sequence (non-integer ids): the request fails, as the
                sequence came from our own store.
        """
        vector = self.retrieval.user_embeddings([list(query.action_sequence)])[0]
        return dataclasses.replace(query, user_embedding=vector)
