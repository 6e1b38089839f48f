"""The ANN index of learned retrieval: FAISS inner-product search over L2-normalised vectors.

The two-tower model (``models.two_tower``) maps a user action sequence and every candidate post to
L2-normalised vectors; a candidate source asks for the posts with the largest inner product
(= cosine similarity) with the user's vector. :class:`AnnIndex` wraps one FAISS index of the
catalogue's item vectors and maps FAISS's sequential labels back to int64 post ids.

Kinds (``ANN_KINDS``):
- ``hnsw`` (default): ``IndexHNSWFlat`` with ``METRIC_INNER_PRODUCT`` (Malkov & Yashunin, "Efficient
  and robust approximate nearest neighbor search using Hierarchical Navigable Small World graphs",
  TPAMI 2018). Exact vectors plus a graph; ``M`` links per node, ``efConstruction`` the build-time
  beam, ``efSearch`` the query-time beam (recall/latency knob; FAISS uses ``max(efSearch, k)``).
- ``ivfpq``: ``IndexIVFPQ`` (Jégou, Douze & Schmid, "Product quantization for nearest neighbor
  search", TPAMI 2011): ``nlist`` k-means cells, each vector stored as ``m`` codes of ``nbits``
  bits (``m * nbits / 8`` bytes instead of ``4 * dim``); ``nprobe`` cells visited per query. For
  catalogues too large for flat vectors in memory; ``refine_factor > 0`` re-ranks the
  ``refine_factor * k`` PQ hits by exact inner product (``IndexRefineFlat``: keeps the flat vectors
  too, so it trades memory back for recall).
- ``flat``: ``IndexFlatIP``, exact search (the ground truth recall is measured against).

Threads: FAISS brings its own OpenMP runtime (the faiss-cpu wheel vendors ``libgomp``, torch
another). Both load in one process without conflict (checked: ``import torch`` then ``import
faiss`` and the reverse, each searching and multiplying in the same process), but each runtime
sizes its own thread pool to every core, so two pools can oversubscribe a small machine:
:func:`set_threads` sets FAISS's pool (one query at a time gains nothing from threads: HNSW
parallelises over queries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ANN_KINDS: tuple[str, ...] = ("hnsw", "ivfpq", "flat")
# HNSW: M = 32 links per node is the paper's and FAISS's usual range for 64-128 dims (M 16-48);
# efConstruction 200 is hnswlib's default (FAISS's 40 builds a weaker graph for a one-off build of a
# few seconds more); efSearch 128 >= k = 100, the retrieval depth of the candidate source.
HNSW_DEFAULTS: dict[str, int] = {"M": 32, "ef_construction": 200, "ef_search": 128}
# IVF-PQ: nlist ~ 4 sqrt(n) cells (FAISS wiki "Guidelines to choose an index"), computed at build
# when not given; m = dim / 2 sub-quantizers of 8 bits (2 dims per byte: recall@100 needs finer
# codes than the usual dim / 8); nprobe 32 cells per query; no re-ranking.
IVFPQ_DEFAULTS: dict[str, int] = {"nlist": 0, "m": 0, "nbits": 8, "nprobe": 32, "refine_factor": 0}
# IVF-PQ trains its coarse k-means and PQ codebooks on a seeded sample of at most this many vectors
# per cell (at least 64 per PQ centroid): FAISS's k-means needs ~39-256 points per centroid, and
# training on a 1M catalogue whole would take minutes on 2 cores for no recall gain.
IVFPQ_TRAIN_PER_CELL = 64
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
META_FILE = "ann.json"
NORM_TOLERANCE = 1e-3


def set_threads(n: int) -> None:
    """Size FAISS's OpenMP pool (process-wide; ``n >= 1``).

    Raises:
        ValueError: ``n < 1``.
    """
    import faiss

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    faiss.omp_set_num_threads(int(n))


def _as_matrix(vectors, what: str, dim: int | None = None) -> np.ndarray:
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-d array [N, D], got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{what} have dimension {x.shape[1]}, the index has {dim}: embed them with the "
                         "same two-tower version the index was built from")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).any(axis=1).sum())
        raise ValueError(f"{what}: {bad} rows hold NaN or inf; fix the embeddings before indexing / searching")
    return x


def _params(kind: str, dim: int, n: int, given: dict[str, Any]) -> dict[str, int]:
    defaults = {"hnsw": HNSW_DEFAULTS, "ivfpq": IVFPQ_DEFAULTS, "flat": {}}[kind]
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {kind} parameters {unknown}; known: {sorted(defaults)}")
    p = {**defaults, **{k: int(v) for k, v in given.items()}}
    if kind == "hnsw":
        if p["M"] < 2 or p["ef_construction"] < 1 or p["ef_search"] < 1:
            raise ValueError(f"hnsw needs M >= 2, ef_construction >= 1, ef_search >= 1; got {p}")
    elif kind == "ivfpq":
        if p["nlist"] <= 0:
            p["nlist"] = int(max(1, min(n // 39, round(4 * np.sqrt(n)))))  # >= 39 training points per cell
        if p["m"] <= 0:
            p["m"] = max(1, dim // 2)
        if dim % p["m"]:
            raise ValueError(f"ivfpq: m={p['m']} must divide the dimension {dim}")
        if not 1 <= p["nbits"] <= 16 or p["nprobe"] < 1 or p["refine_factor"] < 0:
            raise ValueError(f"ivfpq needs 1 <= nbits <= 16, nprobe >= 1, refine_factor >= 0; got {p}")
        need = max(p["nlist"], 2 ** p["nbits"])
        if n < need:
            raise ValueError(f"ivfpq with nlist={p['nlist']}, nbits={p['nbits']} needs >= {need} vectors to "
                             f"train its quantizers, got {n}: use kind='hnsw' (or 'flat') for a small catalogue")
    return p


def _apply_search_params(index, kind: str, params: dict[str, int]) -> None:
    import faiss

    if kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])
    elif kind == "ivfpq":
        faiss.extract_index_ivf(index).nprobe = int(params["nprobe"])


@dataclass
class AnnIndex:
    """A FAISS inner-product index over L2-normalised item vectors, with int64 post ids.

    Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` / :meth:`load`.

    Attributes:
        kind: one of ``ANN_KINDS``.
        dim: vector dimension D.
        ids: int64 ``[N]``: ``ids[label]`` is the post id of FAISS label ``label``.
        params: the kind's parameters as built (``HNSW_DEFAULTS`` / ``IVFPQ_DEFAULTS`` keys).
        index: the ``faiss.Index``.
        build_seconds: wall time of :meth:`build` (0.0 for a loaded index).
    """

    kind: str
    dim: int
    ids: np.ndarray
    params: dict[str, int]
    index: Any = field(repr=False)
    build_seconds: float = 0.0

    @classmethod
    def build(cls, ids, vectors, kind: str = "hnsw", *, normalize: bool = False, **params) -> "AnnIndex":
        """Index ``vectors`` (one row per post) under ``ids``.

        Args:
            ids: int64-convertible ``[N]``, distinct post ids.
            vectors: float ``[N, D]``, finite, L2-normalised (unit rows); ``normalize=True``
                normalises them here instead.
            kind: ``"hnsw"`` (default), ``"ivfpq"`` or ``"flat"``.
            **params: the kind's parameters (``HNSW_DEFAULTS``: ``M``, ``ef_construction``,
                ``ef_search``; ``IVFPQ_DEFAULTS``: ``nlist``, ``m``, ``nbits``, ``nprobe``,
                ``refine_factor``); ``ivfpq``'s ``nlist`` / ``m`` of 0 are chosen from N and D.

        Returns:
            :class:`AnnIndex`.

        Raises:
            ValueError: unknown kind or parameter; N = 0; ids not 1-d, not distinct or not length
                N; vectors not 2-d or not finite; rows not unit length (and ``normalize=False``) or
                zero rows (cannot be normalised); too few vectors to train ``ivfpq``.
        """
        import time

        import faiss

        if kind not in ANN_KINDS:
            raise ValueError(f"unknown ANN index kind {kind!r}; use one of {ANN_KINDS}")
        x = _as_matrix(vectors, "vectors")
        ids = np.asarray(ids)
        if ids.ndim != 1 or len(ids) != len(x):
            raise ValueError(f"ids must be 1-d with one id per vector row: {np.shape(ids)} ids, {len(x)} vectors")
        if len(x) == 0:
            raise ValueError("no vectors to index: embed the catalogue first (TwoTowerFit.item_embeddings)")
        if len(np.unique(ids)) != len(ids):
            raise ValueError(f"ids are not distinct ({len(ids) - len(np.unique(ids))} repeats): one row per post")
        ids = ids.astype(np.int64)
        norms = np.linalg.norm(x, axis=1)
        if (norms == 0).any():
            raise ValueError(f"{int((norms == 0).sum())} vectors are all zeros: they have no direction to search by")
        if normalize:
            x = np.ascontiguousarray(x / norms[:, None], dtype=np.float32)
        elif np.abs(norms - 1).max() > NORM_TOLERANCE:
            raise ValueError(f"vectors are not L2-normalised (norms {norms.min():.4f}..{norms.max():.4f}): "
                             "inner product then is not cosine similarity; pass normalize=True")
        d = x.shape[1]
        p = _params(kind, d, len(x), params)
        started = time.perf_counter()
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, p["M"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = p["ef_construction"]
        else:
            # faiss's Python constructors keep the wrapped quantizer / base index referenced
            ivf = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["m"], p["nbits"],
                                   faiss.METRIC_INNER_PRODUCT)
            ivf.cp.seed = 0  # deterministic k-means
            index = ivf
            if p["refine_factor"] > 0:
                index = faiss.IndexRefineFlat(ivf)
                index.k_factor = float(p["refine_factor"])
            cap = max(IVFPQ_TRAIN_PER_CELL * p["nlist"], 64 * 2 ** p["nbits"])
            sample = x if len(x) <= cap else x[np.sort(np.random.default_rng(0).choice(len(x), cap, replace=False))]
            index.train(sample)
        index.add(x)
        _apply_search_params(index, kind, p)
        return cls(kind=kind, dim=d, ids=ids.copy(), params=p, index=index,
                   build_seconds=time.perf_counter() - started)

    @property
    def ntotal(self) -> int:
        """Vectors indexed."""
        return int(self.index.ntotal)

    def set_search_params(self, **params) -> None:
        """Change query-time knobs: ``ef_search`` (hnsw), ``nprobe`` / ``refine_factor`` (ivfpq).

        Raises:
            ValueError: a knob that is not a query-time knob of this kind, or a value < 1
                (``refine_factor``: < 1 once built with re-ranking).
        """
        allowed = {"hnsw": {"ef_search"}, "ivfpq": {"nprobe", "refine_factor"}, "flat": set()}[self.kind]
        bad = sorted(set(params) - allowed)
        if bad:
            raise ValueError(f"{bad} are not query-time parameters of a {self.kind} index (those are {sorted(allowed)})")
        for k, v in params.items():
            if int(v) < 1:
                raise ValueError(f"{k} must be >= 1, got {v}")
            if k == "refine_factor":
                if self.params["refine_factor"] == 0:
                    raise ValueError("this ivfpq index was built without re-ranking (refine_factor=0)")
                self.index.k_factor = float(v)
            self.params[k] = int(v)
        _apply_search_params(self.index, self.kind, self.params)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` items with the largest inner product with each query, best first.

        Args:
            queries: float ``[Q, D]`` (a single ``[D]`` vector is taken as ``[1, D]``), finite.
            k: results per query, >= 1.

        Returns:
            ``(ids int64 [Q, k], scores float32 [Q, k])``: post ids and inner products, best first;
            where fewer than ``k`` items are found (``k`` > N, or an approximate search that
            found fewer) the row is padded with id ``-1`` and score ``-inf``.

        Raises:
            ValueError: ``k < 1``, queries not [Q, D] of this index's D, or not finite.
        """
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        q = _as_matrix(q, "queries", self.dim)
        if len(q) == 0:
            return np.zeros((0, int(k)), dtype=np.int64), np.zeros((0, int(k)), dtype=np.float32)
        scores, labels = self.index.search(q, int(k))
        found = labels >= 0
        ids = np.where(found, self.ids[np.where(found, labels, 0)], -1).astype(np.int64)
        return ids, np.where(found, scores, -np.inf).astype(np.float32)

    def memory_bytes(self) -> int:
        """Size of the serialised index (``faiss.serialize_index``): its memory footprint, ids excluded."""
        import faiss

        return int(faiss.serialize_index(self.index).nbytes)

    def save(self, path: Path | str) -> Path:
        """Write ``index.faiss`` (``faiss.write_index``), ``ids.npy`` and ``ann.json`` into folder ``path``.

        Returns:
            The folder (created if missing).
        """
        import faiss

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(folder / INDEX_FILE))
        np.save(folder / IDS_FILE, self.ids)
        (folder / META_FILE).write_text(json.dumps({
            "kind": self.kind, "dim": self.dim, "count": int(len(self.ids)), "params": self.params,
            "faiss_version": faiss.__version__, "build_seconds": round(self.build_seconds, 3),
        }, indent=1))
        return folder

    @classmethod
    def load(cls, path: Path | str) -> "AnnIndex":
        """Read an index written by :meth:`save` (search parameters restored from ``ann.json``).

        Raises:
            FileNotFoundError: a file of the folder is missing.
            ValueError: the files disagree (count, dimension or kind).
        """
        import faiss

        folder = Path(path)
        for name in (INDEX_FILE, IDS_FILE, META_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} is missing: not an AnnIndex folder (AnnIndex.save writes it)")
        meta = json.loads((folder / META_FILE).read_text())
        index = faiss.read_index(str(folder / INDEX_FILE))
        ids = np.load(folder / IDS_FILE).astype(np.int64, copy=False)
        if meta.get("kind") not in ANN_KINDS:
            raise ValueError(f"{folder}: unknown index kind {meta.get('kind')!r}")
        if not (index.ntotal == len(ids) == meta["count"]) or index.d != meta["dim"]:
            raise ValueError(f"{folder}: index holds {index.ntotal} x {index.d}, ids {len(ids)}, "
                             f"ann.json says {meta['count']} x {meta['dim']}: the folder is inconsistent, rebuild it")
        params = {k: int(v) for k, v in meta["params"].items()}
        _apply_search_params(index, meta["kind"], params)
        return cls(kind=meta["kind"], dim=int(meta["dim"]), ids=ids, params=params, index=index)


def exact_recall_at_k(approx_ids, exact_ids, k: int | None = None) -> float:
    """Mean over queries of ``|approx[:k] ∩ exact[:k]| / |exact[:k]|`` (the ANN recall@k).

    Args:
        approx_ids: int ``[Q, >= k]`` ids from the approximate index (-1 = padding, never a hit).
        exact_ids: int ``[Q, >= k]`` ids from exact search (-1 padding is not counted in the
            denominator).
        k: the cut-off; default the width of ``exact_ids``.

    Returns:
        Recall in [0, 1]; NaN when no query has an exact neighbour.

    Raises:
        ValueError: row counts differ, k < 1, or an array is narrower than k.
    """
    a, e = np.asarray(approx_ids), np.asarray(exact_ids)
    if a.ndim != 2 or e.ndim != 2 or len(a) != len(e):
        raise ValueError(f"need two [Q, k] id arrays with the same Q, got {a.shape} and {e.shape}")
    k = e.shape[1] if k is None else int(k)
    if k < 1 or a.shape[1] < k or e.shape[1] < k:
        raise ValueError(f"k must be >= 1 and <= the widths {a.shape[1]}, {e.shape[1]}; got {k}")
    recalls = []
    for row_a, row_e in zip(a[:, :k], e[:, :k]):
        truth = set(row_e[row_e >= 0].tolist())
        if truth:
            recalls.append(len(truth.intersection(row_a[row_a >= 0].tolist())) / len(truth))
    return float(np.mean(recalls)) if recalls else float("nan")


__all__ = ["ANN_KINDS", "AnnIndex", "HNSW_DEFAULTS", "IVFPQ_DEFAULTS", "exact_recall_at_k", "set_threads"]
