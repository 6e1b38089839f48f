"""The FAISS ANN index wrapper: recall against exact search, ids, persistence, errors."""

from __future__ import annotations

import numpy as np
import pytest

from models.ann_index import AnnIndex, exact_recall_at_k, set_threads

set_threads(1)  # the tests share 2 cores; two OpenMP pools would oversubscribe them


def clustered(n: int, dim: int, clusters: int = 40, spread: float = 0.35, seed: int = 0) -> np.ndarray:
    """Unit vectors from a Gaussian mixture (embeddings are clustered, not uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    x = clustered(6000, 32)
    ids = (10**12 + 7 * np.arange(len(x))).astype(np.int64)  # post ids far from FAISS's labels
    queries = clustered(300, 32, seed=1)
    return ids, x, queries


def test_hnsw_recall_against_exact_search(data):
    ids, x, q = data
    flat = AnnIndex.build(ids, x, "flat")
    hnsw = AnnIndex.build(ids, x)  # hnsw by default
    assert hnsw.kind == "hnsw" and hnsw.params["M"] == 32 and hnsw.ntotal == len(x) and hnsw.dim == 32
    exact, exact_scores = flat.search(q, 50)
    approx, approx_scores = hnsw.search(q, 50)
    assert exact.shape == approx.shape == (300, 50) and exact.dtype == np.int64 and approx_scores.dtype == np.float32
    assert exact_recall_at_k(approx, exact) >= 0.9
    # exact scores are the inner products, best first
    np.testing.assert_allclose(exact_scores[:, 0], np.max(q @ x.T, axis=1), rtol=1e-5)
    assert (np.diff(exact_scores, axis=1) <= 1e-6).all()
    # a smaller beam cannot find more
    hnsw.set_search_params(ef_search=16)
    assert hnsw.params["ef_search"] == 16
    assert exact_recall_at_k(hnsw.search(q, 50)[0], exact) <= exact_recall_at_k(approx, exact) + 1e-9


def test_ids_map_back_and_padding(data):
    ids, x, _ = data
    flat = AnnIndex.build(ids, x, "flat")
    got, scores = flat.search(x[[5, 17]], 1)
    assert got[:, 0].tolist() == [ids[5], ids[17]]
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-5)
    small = AnnIndex.build(ids[:3], x[:3], "hnsw")
    got, scores = small.search(x[0], 5)  # a single [D] query is one row
    assert got.shape == (1, 5) and set(got[0, :3].tolist()) == set(ids[:3].tolist())
    assert got[0, 3:].tolist() == [-1, -1] and np.isneginf(scores[0, 3:]).all()
    assert flat.search(np.zeros((0, 32), np.float32), 3)[0].shape == (0, 3)


@pytest.mark.parametrize("kind,params", [("hnsw", {"ef_search": 64}), ("flat", {}),
                                         ("ivfpq", {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 4}),
                                         ("ivfpq", {"nlist": 16, "m": 8, "nbits": 6, "nprobe": 4, "refine_factor": 3})])
def test_save_load_round_trip(data, kind, params, tmp_path):
    ids, x, q = data
    index = AnnIndex.build(ids[:2000], x[:2000], kind, **params)
    before = index.search(q, 20)
    index.save(tmp_path / "idx")
    loaded = AnnIndex.load(tmp_path / "idx")
    assert (loaded.kind, loaded.dim, loaded.params) == (index.kind, index.dim, index.params)
    after = loaded.search(q, 20)
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert loaded.memory_bytes() == index.memory_bytes() > 0


def test_ivfpq_is_smaller_and_still_finds_neighbours(data):
    ids, x, q = data
    exact = AnnIndex.build(ids, x, "flat").search(q, 20)[0]
    pq = AnnIndex.build(ids, x, "ivfpq", nlist=32, m=8, nbits=8, nprobe=8)
    assert pq.memory_bytes() < AnnIndex.build(ids, x, "flat").memory_bytes() / 4
    assert exact_recall_at_k(pq.search(q, 20)[0], exact) > 0.3
    refined = AnnIndex.build(ids, x, "ivfpq", nlist=32, m=8, nbits=8, nprobe=8, refine_factor=4)
    assert exact_recall_at_k(refined.search(q, 20)[0], exact) > exact_recall_at_k(pq.search(q, 20)[0], exact)


def test_exact_recall_helper():
    approx = np.array([[1, 2, 3], [4, -1, -1]])
    exact = np.array([[3, 2, 9], [4, 5, -1]])
    assert exact_recall_at_k(approx, exact) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert exact_recall_at_k(approx, exact, k=1) == pytest.approx(0.5)  # {1} vs {3}, {4} vs {4}
    with pytest.raises(ValueError, match="k must be"):
        exact_recall_at_k(approx, exact, k=4)
    with pytest.raises(ValueError, match="same Q"):
        exact_recall_at_k(approx[:1], exact)


def test_clear_errors(data, tmp_path):
    ids, x, q = data
    index = AnnIndex.build(ids[:500], x[:500], "flat")
    with pytest.raises(ValueError, match="dimension 16, the index has 32"):
        index.search(q[:, :16], 5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(q, 0)
    bad = q.copy()
    bad[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        index.search(bad, 5)
    with pytest.raises(ValueError, match="NaN or inf"):
        AnnIndex.build(ids[:500], np.where(np.arange(500)[:, None] == 7, np.inf, x[:500]))
    with pytest.raises(ValueError, match="not L2-normalised"):
        AnnIndex.build(ids[:500], 2 * x[:500])
    assert AnnIndex.build(ids[:500], 2 * x[:500], "flat", normalize=True).search(x[:1], 1)[0][0, 0] == ids[0]
    with pytest.raises(ValueError, match="all zeros"):
        AnnIndex.build(ids[:2], np.zeros((2, 32), np.float32), normalize=True)
    with pytest.raises(ValueError, match="not distinct"):
        AnnIndex.build(np.zeros(500, np.int64), x[:500])
    with pytest.raises(ValueError, match="one id per vector"):
        AnnIndex.build(ids[:10], x[:500])
    with pytest.raises(ValueError, match="no vectors"):
        AnnIndex.build(ids[:0], x[:0])
    with pytest.raises(ValueError, match="unknown ANN index kind"):
        AnnIndex.build(ids[:500], x[:500], "annoy")
    with pytest.raises(ValueError, match="unknown hnsw parameters"):
        AnnIndex.build(ids[:500], x[:500], "hnsw", nprobe=3)
    with pytest.raises(ValueError, match="needs >= 256 vectors"):
        AnnIndex.build(ids[:100], x[:100], "ivfpq", nlist=4, m=8)
    with pytest.raises(ValueError, match="must divide"):
        AnnIndex.build(ids[:500], x[:500], "ivfpq", nlist=4, m=5, nbits=4)
    with pytest.raises(ValueError, match="not query-time parameters"):
        index.set_search_params(ef_search=10)
    with pytest.raises(FileNotFoundError, match="index.faiss"):
        AnnIndex.load(tmp_path)
