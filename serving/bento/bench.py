"""Latency of one batch through the BentoML server against in-process scoring, both rankers.

Starts the server as a child process (its pid, port and log in a temporary folder, so the state
folder is only read), loads the same champion versions in-process, checks both paths agree on
real rows, then times ``--requests`` sequential calls per path (one client, so each number is a
single call's latency) and prints p50/p99 and the BentoML/in-process ratio. Stops the server.

    .venv/bin/python -m serving.bento.bench [--state .state] [--rows 1000] [--requests 300]

Rows are the last ``--rows`` of the state's training set (``tables/training_set.parquet``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from models.features import feature_matrix
from models.registry import load_ranker
from serving.bento.client import BentoRankerClient
from serving.bento.server import BentoServer


def timings_ms(fn, requests: int, warmup: int = 20) -> np.ndarray:
    """Wall time of ``requests`` sequential calls of ``fn`` in ms, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = np.empty(requests)
    for i in range(requests):
        t = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t) * 1000.0
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None, help="state folder with the MLflow registry and training set")
    ap.add_argument("--tracking-uri", default=None, help="MLflow URI (default: the state folder's)")
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=300)
    args = ap.parse_args(argv)
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()
    uri = args.tracking_uri or state.mlflow_tracking_uri
    frame = pd.read_parquet(state.table("training_set")).tail(args.rows).reset_index(drop=True)
    handles = {n: load_ranker(n, tracking_uri=uri) for n in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)}
    with tempfile.TemporaryDirectory(prefix="home-mixer-bento-bench-") as tmp:
        server = BentoServer(StateDir(Path(tmp)).ensure())
        started = time.monotonic()
        server.start(tracking_uri=uri)
        print(f"bentoml ready in {time.monotonic() - started:.1f} s at {server.url}")
        try:
            with BentoRankerClient(server.url) as client:
                print(f"{len(frame)} rows per batch, {args.requests} sequential calls per path")
                for name, h in handles.items():
                    x = feature_matrix(frame, h.feature_names)
                    diff = np.abs(client.predict(x, name, h.version, 10.0) - h.predict(frame)).max()
                    remote = timings_ms(lambda: client.predict(x, name, h.version, 10.0), args.requests)
                    local = timings_ms(lambda: h.predict(frame), args.requests)
                    for label, t in (("bentoml (binary)", remote), ("in-process", local)):
                        print(f"{name} v{h.version:<3} {label:17s} p50 {np.percentile(t, 50):7.2f} ms   "
                              f"p99 {np.percentile(t, 99):7.2f} ms")
                    print(f"{name} v{h.version:<3} ratio bentoml/in-process p50 "
                          f"{np.percentile(remote, 50) / np.percentile(local, 50):.1f}x, max |diff| {diff:.2e}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
