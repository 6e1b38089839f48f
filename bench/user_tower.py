"""Latency of the two-tower user tower for one request (one user's action sequence), per serving
path, in one run: in-process (torch, what ``UserEmbeddingQueryHydrator`` runs by default), ONNX
Runtime in-process (the checked export, one intra-op thread) and Triton gRPC (binary tensors,
python backend running onnxruntime), each from the sequence (the shared tensorisation included).

With ``--state`` the registered champion two-tower of that state folder is used, and the
sequences are its users' real ones; without it a tower of the default size (64-d, 64 entries) with
random weights over a KuaiRand-sized vocabulary (latency does not depend on the weights) and
sequences whose lengths follow the real ones' spread (median 13, up to 64). Triton is started
on a repository written in a temporary folder and stopped at the end. Prints p50/p99 per path and
each p50's ratio to in-process, and the largest |diff| to the in-process vectors.

    .venv/bin/python bench/user_tower.py [--state .state] [--requests 500]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# project's `serving` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import torch

from core.state import StateDir
from serving.bento.bench import timings_ms


def _synthetic(n_users: int = 200):
    from models.two_tower import TwoTowerFit, TwoTowerParams, build_net
    from pipelines.sequences import ACTION_STRENGTH

    params = TwoTowerParams()
    torch.manual_seed(0)
    posts, authors = np.arange(1, 7_584, dtype=np.int64), np.arange(1, 3_000, dtype=np.int64)
    fit = TwoTowerFit(net=build_net(len(posts), len(authors), 300, params).eval(), params=params,
                      post_vocab=posts, author_vocab=authors, tag_vocab=np.arange(300, dtype=np.int64))
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 13, n_users), 64)
    seqs = [[(int(rng.choice(posts)), int(rng.choice(authors)), ACTION_STRENGTH[int(rng.integers(len(ACTION_STRENGTH)))])
             for _ in range(n)] for n in lengths]

    class Handle:  # what serving.user_tower_export needs of a registered version
        name, version, alias, run_id, model, dim = "two_tower", 1, "", "synthetic", fit, fit.dim

    return Handle(), seqs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None, help="state folder with a registered two-tower (default: synthetic)")
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()

    from serving.export import onnx_session
    from serving.triton.client import TritonUserTowerClient
    from serving.triton.repository import PYTHON_MODEL_SOURCE, RepositorySettings, _write_config_texts, \
        render_user_tower_config
    from serving.triton.server import TritonServer
    from serving.user_tower_export import OUTPUT_NAME, export_user_tower

    torch.set_num_threads(1)  # as the mixer runs it (scoring.threads: 1)
    if args.state:
        from models.registry import load_two_tower
        from serving.user_tower_export import validation_sequences

        state = StateDir(Path(args.state).resolve())
        handle = load_two_tower(state.mlflow_tracking_uri)
        seqs = validation_sequences(state, n=200)
    else:
        handle, seqs = _synthetic()
    fit = handle.model
    tmp = Path(tempfile.mkdtemp(prefix="hm-bench-user-tower-"))
    try:
        repo = tmp / "repository"
        res = export_user_tower(handle, repo / "two_tower" / "1", seqs)
        shutil.copyfile(PYTHON_MODEL_SOURCE, repo / "two_tower" / "1" / "model.py")
        # one intra-op thread in Triton too: one request is one user, far too small to split
        settings = RepositorySettings(intra_op_threads=1, max_queue_delay_us=0)
        _write_config_texts(repo / "two_tower", lambda backend: render_user_tower_config(
            "two_tower", fit.params.max_sequence_length, fit.dim, [1], settings, backend=backend))
        session = onnx_session(res.path, threads=1)
        server = TritonServer(StateDir(tmp / "state").ensure(), repo_dir=repo, models=("two_tower",)).start(timeout_s=120)
        client = TritonUserTowerClient(server.grpc_url, "two_tower", timeout_s=5.0)
        try:
            rng = np.random.default_rng(1)
            order = rng.integers(len(seqs), size=args.requests + 20)
            paths = {
                "in-process (torch)": lambda s: fit.user_embeddings([s]),
                "ONNX Runtime in-process": lambda s: session.run([OUTPUT_NAME], fit.user_tower_inputs([s]).arrays())[0],
                "Triton gRPC": lambda s: client.user_embeddings([s], fit),
            }
            want = fit.user_embeddings(seqs)
            rows = []
            for label, fn in paths.items():
                it = iter(order)
                ms = timings_ms(lambda: fn(seqs[next(it)]), args.requests)
                diff = max(float(np.abs(fn(s) - w).max()) for s, w in zip(seqs[:50], want[:50]))
                rows.append((label, np.percentile(ms, 50), np.percentile(ms, 99), diff))
        finally:
            client.close()
            server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    source = f"registered {handle.name} v{handle.version}" if args.state else "synthetic tower (random weights)"
    print(f"user tower, one request (1 user), {args.requests} sequential calls, one thread; {source}, "
          f"D={fit.dim}, L={fit.params.max_sequence_length}; export check max |diff| {res.max_abs_diff:.1e}")
    base = rows[0][1]
    print(f"{'path':<26} {'p50 ms':>8} {'p99 ms':>8} {'p50 / in-process':>17} {'max |diff|':>11}")
    for label, p50, p99, diff in rows:
        print(f"{label:<26} {p50:8.3f} {p99:8.3f} {p50 / base:16.2f}x {diff:11.1e}")


if __name__ == "__main__":
    main()
