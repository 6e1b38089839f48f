"""EmbeddingCandidateSource over a real FAISS index (exact, inner product) and a fixed user tower."""

from __future__ import annotations

import numpy as np
import pytest

from mixer.candidate import EngagedAction, Query
from mixer.candidate_sources import EmbeddingCandidateSource
from models.ann_index import AnnIndex


class Retrieval:
    """User vector = the mean of the sequence posts' vectors (unit); a cold start is post 0's."""

    version = 7

    def __init__(self, ids, vectors):
        self.item_ids, self.item_vectors = ids, vectors
        self.vectors = dict(zip(ids.tolist(), vectors))
        self.index = AnnIndex.build(ids, vectors, kind="flat")
        self.seen: list = []

    def user_embeddings(self, sequences):
        self.seen.append(sequences)
        out = []
        for seq in sequences:
            v = np.mean([self.vectors[a[0]] for a in seq], axis=0) if seq else self.vectors[0]
            out.append(v / np.linalg.norm(v))
        return np.asarray(out, dtype=np.float32)

    def search(self, vectors, k):
        return self.index.search(vectors, k)


def _catalogue(n=50, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return np.arange(n, dtype=np.int64), v / np.linalg.norm(v, axis=1, keepdims=True)


def _query(sequence):
    return Query(user_id=1, page_size=20, now_s=0.0, request_id="r", action_sequence=sequence)


def test_returns_the_nearest_posts_to_the_user_vector_without_the_sequence_posts():
    ids, vectors = _catalogue()
    retrieval = Retrieval(ids, vectors)
    source = EmbeddingCandidateSource(retrieval, max_candidates=10)
    seq = (EngagedAction(3, 30, "long_view", 1.0), EngagedAction(8, 80, "like", 0.5))
    out = source.fetch(_query(seq))
    user = retrieval.user_embeddings([list(seq)])[0]
    exact = [int(i) for i in np.argsort(-(vectors @ user)) if i not in (3, 8)][:10]
    assert [c.post_id for c in out] == exact
    assert [c.source_score for c in out] == pytest.approx(sorted((vectors @ user)[exact], reverse=True), abs=1e-5)
    assert all(c.source == "embedding" for c in out)
    assert retrieval.seen[0][0][0] == seq[0]  # the tower gets the sequence newest first, as hydrated


def test_cold_start_unknown_sequence_and_gates():
    ids, vectors = _catalogue()
    source = EmbeddingCandidateSource(Retrieval(ids, vectors), max_candidates=5)
    assert len(source.fetch(_query(()))) == 5  # no history: the cold-start vector still retrieves
    assert source.fetch(_query(None)) == []    # Redis down: the sequence is unknown, no guess
    assert source.enabled(_query(())) and source.version == "7" and source.served_model == "two_tower"
    off = EmbeddingCandidateSource(None)
    assert not off.enabled(_query(())) and off.version == ""
    assert not EmbeddingCandidateSource(Retrieval(ids, vectors), enabled=False).enabled(_query(()))
    with pytest.raises(ValueError, match="max_candidates"):
        EmbeddingCandidateSource(None, max_candidates=0)


def test_retrieval_score_feature_is_the_cosine_with_the_user_vector_nan_outside_the_catalogue():
    import pandas as pd

    from core.schema import RETRIEVAL_FEATURES
    from mixer.candidate import Candidate
    from mixer.feature_hydrators.retrieval import RetrievalScoreFeatureHydrator

    ids, vectors = _catalogue()
    shuffled = np.random.default_rng(3).permutation(len(ids))  # the catalogue's rows in any id order
    retrieval = Retrieval(ids[shuffled], vectors[shuffled])
    hydrator = RetrievalScoreFeatureHydrator(retrieval)
    seq = (EngagedAction(4, 40, "like", 0.0),)
    cands = [Candidate(p, "popular") for p in (7, 999, 4, 0)]
    frame = pd.DataFrame({"x": np.zeros(4)})
    out = hydrator.hydrate(_query(seq), cands, frame)[RETRIEVAL_FEATURES[0]].to_numpy()
    user = vectors[4] / np.linalg.norm(vectors[4])
    np.testing.assert_allclose(out[[0, 2, 3]], vectors[[7, 4, 0]] @ user, rtol=1e-5)
    assert np.isnan(out[1])  # post 999 is not in the registered catalogue
    assert out[2] == pytest.approx(1.0, abs=1e-5)  # a sequence of one post: its own vector
    with pytest.raises(RuntimeError, match="sequence"):
        hydrator.hydrate(_query(None), cands, frame)
    with pytest.raises(ValueError, match="refines the frame"):
        hydrator.hydrate(_query(seq), cands, None)
    assert hydrator.enabled(_query(seq)) and not RetrievalScoreFeatureHydrator(None).enabled(_query(seq))


def test_the_user_tower_runs_once_per_request_for_the_source_and_the_retrieval_scores():
    import pandas as pd

    from mixer.candidate import Candidate
    from mixer.feature_hydrators.retrieval import RetrievalScoreFeatureHydrator
    from mixer.query_hydrators import UserEmbeddingQueryHydrator

    ids, vectors = _catalogue()
    retrieval = Retrieval(ids, vectors)
    seq = (EngagedAction(3, 30, "long_view", 1.0), EngagedAction(8, 80, "like", 0.5))
    hydrator = UserEmbeddingQueryHydrator(retrieval)
    assert not hydrator.enabled(_query(None)) and not UserEmbeddingQueryHydrator(None).enabled(_query(seq))
    query = hydrator.hydrate(_query(seq))
    assert len(retrieval.seen) == 1
    np.testing.assert_allclose(query.user_embedding, retrieval.user_embeddings([list(seq)])[0])
    retrieval.seen.clear()
    found = EmbeddingCandidateSource(retrieval, max_candidates=5).fetch(query)
    cands = [Candidate(post_id=c.post_id, source=c.source) for c in found]
    frame = pd.DataFrame({"post_duration_ms": np.nan, "post_is_ad": np.nan}, index=range(len(cands)))
    scored = RetrievalScoreFeatureHydrator(retrieval).hydrate(query, cands, frame)
    assert retrieval.seen == []  # neither ran the tower again
    np.testing.assert_allclose(scored["retrieval_two_tower_score"], [c.source_score for c in found], atol=1e-5)
    # a query hydrated without it (no vector) still works: the consumers compute it themselves
    assert [c.post_id for c in EmbeddingCandidateSource(retrieval, max_candidates=5).fetch(_query(seq))] == \
        [c.post_id for c in found]
    assert len(retrieval.seen) == 1
