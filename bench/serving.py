"""Latency of one 1000-row batch per serving path, against the mixer's in-process path, in one run.

Paths per model: in-process scoring as the mixer does it (``RankerHandle.predict`` on a DataFrame,
one thread, ``scoring.threads: 1``), ONNX Runtime in-process (the exported graph, one intra-op
thread), Triton gRPC and Triton HTTP with binary tensors (python backend running onnxruntime), and
BentoML with a binary float32 body. The light ranker is scored in process two ways: ``lleaves``
(compiled with LLVM, ``light_ranker.backend: compiled``, the mixer's default) and ``lightgbm``
(LightGBM's own predict, the fallback), each also on the bare float32 matrix (``*_matrix``: the
model call without the frame-to-matrix step). Needs a state folder the demo filled; starts Triton
and BentoML from it (repository synced from the registry first) and stops them at the end. Prints
p50/p99 per path and model, each p50's ratio to the mixer's in-process path (light: lleaves), and
the light ranker's compiled p50 against its 2 ms target and its peers.

    .venv/bin/python bench/serving.py [--state .state] [--rows 1000] [--requests 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# project's `serving` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import pandas as pd
import torch

from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from models.light_ranker import predict_booster
from models.registry import load_ranker, load_ranker_version, with_compiled_light
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
    from serving.export import INPUT_NAME, OUTPUT_NAME, onnx_session, to_onnx, validation_rows
    from serving.triton.client import TritonRankerClient
    from serving.triton.repository import sync_repository
    from serving.triton.server import TritonServer, repository_dir

    frame: pd.DataFrame = validation_rows(state, n=args.rows)
    uri = state.mlflow_tracking_uri
    # one thread, as the mixer scores (scoring.threads: 1); the heavy ranker's torch pool likewise
    torch.set_num_threads(1)
    handles = {n: dataclasses.replace(load_ranker(n, tracking_uri=uri), num_threads=1)
               for n in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)}
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
            ort = onnx_session(to_onnx(load_ranker_version(name, version, uri, with_program=True)), threads=1)
            calls = {}
            if h.kind == "light":
                fast = with_compiled_light(h, state.compiled_models, check_rows=frame)
                if fast.compiled is None:
                    sys.exit("lleaves could not compile the light ranker (see the warning above)")
                calls.update({
                    "lleaves": lambda: fast.predict(cols),
                    "lleaves_matrix": lambda: fast.compiled.predict(x, n_jobs=1),
                    "lightgbm": lambda: h.predict(cols),
                    "lightgbm_matrix": lambda: predict_booster(h.model, x, num_threads=1),
                })
            else:
                calls["in_process"] = lambda: h.predict(cols)
            calls.update({
                "onnxruntime": lambda: ort.run([OUTPUT_NAME], {INPUT_NAME: x})[0],
                "triton_grpc": lambda: grpc.predict(x, version=version, timeout_s=5),
                "triton_http": lambda: http.predict(x, version=version, timeout_s=5),
                "bentoml": lambda: bento_client.predict(x, model=name, version=version, timeout_s=5),
            })
            for path, fn in calls.items():
                diff = float(np.nanmax(np.abs(np.asarray(fn(), dtype=np.float64).reshape(reference.shape) - reference)))
                t = timings_ms(fn, args.requests)
                rows.append((name, path, np.percentile(t, 50), np.percentile(t, 99), diff))
            grpc.close()
            http.close()
        bento_client.close()
    finally:
        for server in started:
            server.stop()

    table = pd.DataFrame(rows, columns=["model", "path", "p50_ms", "p99_ms", "max_abs_diff"])
    # the mixer's in-process path: compiled for the light ranker, torch for the heavy one
    base_path = {LIGHT_RANKER_NAME: "lleaves", HEAVY_RANKER_NAME: "in_process"}
    base = {m: float(table[(table.model == m) & (table.path == p)].p50_ms.iloc[0]) for m, p in base_path.items()}
    table["p50_vs_in_process"] = table.p50_ms / table.model.map(base)
    print(f"{args.rows}-row batches, {args.requests} sequential calls per path (one client, one thread)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    light = table[table.model == LIGHT_RANKER_NAME].set_index("path")
    compiled = light.loc["lleaves_matrix"]
    peers = ", ".join(f"{p} {light.loc[p].p50_ms / compiled.p50_ms:.1f}x"
                      for p in ("lightgbm_matrix", "lightgbm", "onnxruntime", "triton_grpc", "triton_http"))
    print(f"light ranker compiled (lleaves, n_jobs=1): p50 {compiled.p50_ms:.3g} ms, p99 {compiled.p99_ms:.3g} ms "
          f"for {args.rows} rows ({compiled.p50_ms / 2.0:.2f}x the 2 ms target); peers' p50 / compiled p50: {peers}; "
          f"max |diff| to LightGBM {compiled.max_abs_diff:.2g}")


if __name__ == "__main__":
    main()
