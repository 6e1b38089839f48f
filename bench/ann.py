"""ANN index of learned retrieval: recall@100 against exact search, per-query latency, build time
and memory, for FAISS flat (exact), HNSW at several efSearch values and IVF-PQ, against the target
recall@100 >= 0.95 at p99 <= 2 ms per query.

Two corpora in one run:
(a) ``--n`` (default 1,000,000) x ``--dim`` (64) synthetic unit vectors from a Gaussian mixture
    (``--clusters`` centres, isotropic noise), queries drawn from the same mixture. Clustered, not
    uniform: uniform random vectors on a 64-d sphere are all nearly equidistant (concentration of
    measure: every cosine is ~0 +- 0.125), so their "top 100" barely differs from the next 10,000
    and an ANN index looks far worse than on real embeddings, which cluster by topic and author.
(b) the real catalogue: the candidate embeddings of the champion two-tower model registered in
    ``--state`` (``models.train.train_two_tower``), queried with the user vectors of real users'
    action sequences before the model's cutoff; skipped with a message without ``--state``.

Latency is per single query: one FAISS thread, one query at a time, ``--queries`` (1000) queries;
p50 / p99 of the wall time of ``AnnIndex.search(q, 100)`` (the id mapping included). Memory is
``len(faiss.serialize_index(index))``. Build uses ``--build-threads`` (default 2).

    .venv/bin/python bench/ann.py [--n 1000000] [--state PATH] [--queries 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ann_index import AnnIndex, exact_recall_at_k, set_threads  # noqa: E402

TARGET_RECALL = 0.95
TARGET_P99_MS = 2.0
K = 100


def mixture(n: int, dim: int, clusters: int, spread: float, seed: int, centres=None):
    """``n`` unit vectors of a Gaussian mixture (and its centres)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = rng.normal(size=(clusters, dim)) / np.sqrt(dim)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 200_000):  # chunks: bounded temporary memory
        m = min(200_000, n - s)
        chunk = centres[rng.integers(0, len(centres), m)] + spread / np.sqrt(dim) * rng.normal(size=(m, dim))
        x[s:s + m] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return x, centres


def latencies(index: AnnIndex, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids [Q, k], per-query seconds [Q]) searching one query at a time."""
    ids = np.empty((len(queries), k), dtype=np.int64)
    seconds = np.empty(len(queries))
    index.search(queries[:1], k)  # warm-up
    for i in range(len(queries)):
        q = queries[i:i + 1]
        t = time.perf_counter()
        ids[i] = index.search(q, k)[0][0]
        seconds[i] = time.perf_counter() - t
    return ids, seconds


def run_corpus(title: str, ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, efs: list[int],
               ivfpq: list[dict], build_threads: int) -> None:
    print(f"\n{title}: {len(ids):,} x {vectors.shape[1]} vectors, {len(queries)} queries, recall@{K} "
          f"against exact search; target recall >= {TARGET_RECALL} at p99 <= {TARGET_P99_MS} ms")
    print(f"  {'index':<50}{'recall':>8}{'p50 ms':>9}{'p99 ms':>9}{'build s':>9}{'memory MB':>11}"
          f"{'recall/target':>15}{'target/p99':>12}  meets")
    rows = []

    def build(kind, **params):
        set_threads(build_threads)
        index = AnnIndex.build(ids, vectors, kind, **params)
        set_threads(1)
        return index

    flat = build("flat")
    exact, flat_s = latencies(flat, queries, K)
    rows.append(("flat (exact, IndexFlatIP)", flat, 1.0, flat_s))
    hnsw = build("hnsw")
    for ef in efs:
        hnsw.set_search_params(ef_search=ef)
        got, s = latencies(hnsw, queries, K)
        rows.append((f"hnsw M=32 efC=200 efSearch={ef}", hnsw, exact_recall_at_k(got, exact, K), s))
    for params in ivfpq:
        try:
            index = build("ivfpq", **params)
        except ValueError as e:
            print(f"  ivfpq {params}: skipped ({e})")
            continue
        label = "ivfpq " + " ".join(f"{k}={v}" for k, v in index.params.items() if k != "nbits" and v)
        got, s = latencies(index, queries, K)
        rows.append((label, index, exact_recall_at_k(got, exact, K), s))
    for label, index, recall, s in rows:
        p50, p99 = np.percentile(s, 50) * 1e3, np.percentile(s, 99) * 1e3
        meets = recall >= TARGET_RECALL and p99 <= TARGET_P99_MS
        print(f"  {label:<50}{recall:8.4f}{p50:9.3f}{p99:9.3f}{index.build_seconds:9.1f}"
              f"{index.memory_bytes() / 2**20:11.1f}{recall / TARGET_RECALL:15.3f}{TARGET_P99_MS / p99:12.2f}  "
              f"{'yes' if meets else 'no'}")


def real_catalogue(state_root: str | None, n_queries: int):
    """(ids, vectors, queries, description) of the champion two-tower of ``state_root``, or None."""
    if not state_root:
        print("\n(b) real catalogue: skipped (no --state: give a state folder where "
              "models.train.train_two_tower registered a two-tower champion)")
        return None
    import pandas as pd

    from core.state import StateDir
    from models.registry import RankerNotFoundError, load_two_tower
    from models.two_tower import latest_histories
    from pipelines.sequences import engagement_sequences

    state = StateDir(Path(state_root).resolve())
    try:
        handle = load_two_tower(state.mlflow_tracking_uri)
    except RankerNotFoundError as e:
        print(f"\n(b) real catalogue: skipped ({e})")
        return None
    from mlflow import MlflowClient

    run = MlflowClient(tracking_uri=state.mlflow_tracking_uri).get_run(handle.run_id)
    as_of = pd.Timestamp(run.data.params["as_of"])
    imp = pd.read_parquet(state.table("impressions"))
    prelog = pd.read_parquet(state.table("prelog_events")) if state.table("prelog_events").exists() else None
    histories = list(latest_histories(engagement_sequences(imp, prelog, as_of), as_of,
                                      handle.model.params.max_sequence_length).values())
    rng = np.random.default_rng(0)
    chosen = [histories[i] for i in rng.choice(len(histories), min(n_queries, len(histories)), replace=False)]
    queries = handle.user_embeddings(chosen)
    return handle.item_ids, handle.item_vectors, queries, (
        f"(b) real catalogue: two-tower champion v{handle.version} candidate embeddings, user vectors of "
        f"{len(chosen)} real users as of {as_of}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors (default 1,000,000)")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--clusters", type=int, default=2000, help="mixture components of the synthetic set")
    ap.add_argument("--spread", type=float, default=0.7, help="noise scale relative to the centre norm")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--ef", default="100,128,256,512", help="HNSW efSearch values (comma-separated)")
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--state", default=None, help="state folder with a registered two-tower champion")
    args = ap.parse_args(argv)
    efs = [int(v) for v in args.ef.split(",")]
    set_threads(1)

    t = time.perf_counter()
    x, centres = mixture(args.n, args.dim, args.clusters, args.spread, seed=0)
    q, _ = mixture(args.queries, args.dim, args.clusters, args.spread, seed=1, centres=centres)
    print(f"synthetic set generated in {time.perf_counter() - t:.1f} s")
    ivfpq = [dict(nlist=1024, m=32, nprobe=32), dict(nlist=1024, m=32, nprobe=128),
             dict(nlist=1024, m=32, nprobe=128, refine_factor=4)]
    run_corpus(f"(a) synthetic Gaussian mixture ({args.clusters} clusters, spread {args.spread})",
               np.arange(len(x), dtype=np.int64), x, q, efs, ivfpq, args.build_threads)
    del x

    real = real_catalogue(args.state, args.queries)
    if real is not None:
        ids, vectors, queries, title = real
        run_corpus(title, ids, vectors, queries, efs,
                   [dict(nprobe=16), dict(m=16, nprobe=16, refine_factor=4)], args.build_threads)


if __name__ == "__main__":
    main()
