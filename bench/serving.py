"""Latency of one 1000-row batch per serving path, against in-process scoring, in one run.

Paths: in-process (``RankerHandle.predict`` on a DataFrame, what the mixer does by default), Triton
gRPC and Triton HTTP with binary tensors (python backend running onnxruntime), and BentoML with a
binary float32 body. Needs a state folder the demo filled; starts Triton and BentoML from it
(repository synced from the registry first) and stops them at the end. Prints p50/p99 per path
and model, and the ratio of each p50 to the in-process p50.

    .venv/bin/python bench/serving.py [--state .state] [--rows 1000] [--requests 200]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# project's `serving` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import pandas as pd

from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from models.registry import load_ranker
from serving.bento.bench import timings_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()

    from serving.bento.client import BentoRankerClient
    from serving.bento.server import BentoServer
    from serving.export import validation_rows
    from serving.triton.client import TritonRankerClient
    from serving.triton.repository import sync_repository
    from serving.triton.server import TritonServer, repository_dir

    frame: pd.DataFrame = validation_rows(state, n=args.rows)
    uri = state.mlflow_tracking_uri
    handles = {n: load_ranker(n, tracking_uri=uri) for n in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)}
    sync_repository(uri, repository_dir(state), check_rows=frame)
    started = []  # only what this bench started is stopped at the end
    rows = []
    try:
        triton = TritonServer.running(state)
        if triton is None:
            triton = TritonServer(state).start()
            started.append(triton)
        else:
            for name in handles:
                triton.load(name)  # serve what the sync just wrote
        bento = BentoServer.running(state)
        if bento is None:
            bento = BentoServer(state).start()
            started.append(bento)
        bento_client = BentoRankerClient(bento.url)
        for name, h in handles.items():
            cols = frame[list(h.feature_names)]
            x = cols.to_numpy(dtype=np.float32)
            version = int(h.version)
            grpc = TritonRankerClient(triton.grpc_url, name, protocol="grpc")
            http = TritonRankerClient(triton.http_url, name, protocol="http")
            reference = h.predict(cols)
            calls = {
                "in_process": lambda: h.predict(cols),
                "triton_grpc": lambda: grpc.predict(x, version=version, timeout_s=5),
                "triton_http": lambda: http.predict(x, version=version, timeout_s=5),
                "bentoml": lambda: bento_client.predict(x, model=name, version=version, timeout_s=5),
            }
            for path, fn in calls.items():
                diff = float(np.nanmax(np.abs(np.asarray(fn()) - reference)))
                t = timings_ms(fn, args.requests)
                rows.append((name, path, np.percentile(t, 50), np.percentile(t, 99), diff))
            grpc.close()
            http.close()
        bento_client.close()
    finally:
        for server in started:
            server.stop()

    table = pd.DataFrame(rows, columns=["model", "path", "p50_ms", "p99_ms", "max_abs_diff"])
    base = table[table.path == "in_process"].set_index("model")["p50_ms"]
    table["p50_vs_in_process"] = table.p50_ms / table.model.map(base)
    print(f"{args.rows}-row batches, {args.requests} sequential calls per path (one client)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
