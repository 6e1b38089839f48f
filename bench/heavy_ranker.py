"""In-process latency of the heavy ranker's ``predict`` on one request's candidates.

Times ``HeavyRankerFit.predict`` (feature matrix from a DataFrame + the torch module) on ``--rows``
real-shaped rows (sampled from the state's training set; synthetic rows if there is none) over
``--requests`` sequential calls, for the current architecture (MMoE + popularity-prior offset + id embeddings,
default ``HeavyRankerParams``) and, as the peer, the previous shared-bottom 256-128 network (read
from ``git show <--peer-rev>:models/heavy_ranker.py``, read-only; skipped when git is unavailable).
Latency does not depend on the weight values, so the modules are built untrained (normalisation
fitted on the sample). Budget: p99 <= 8 ms for 200 candidates.

    .venv/bin/python bench/heavy_ranker.py [--state .state] [--rows 200] [--requests 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import numpy as np
import pandas as pd
import torch

from core.schema import HEADS, HEAVY_RANKER_FEATURES
from models.features import InputNormalisation, feature_matrix
from models.heavy_ranker import HeavyRankerFit, HeavyRankerNet, HeavyRankerParams
from serving.bento.bench import timings_ms

ROOT = Path(__file__).resolve().parent.parent


def _rows(state_arg: str | None, n: int) -> pd.DataFrame:
    try:
        from core.state import StateDir
        from pipelines.training_set import load_training_set

        state = StateDir(Path(state_arg).resolve()) if state_arg else StateDir.from_env()
        df = load_training_set(state)
        return df.sample(n=min(n, len(df)), random_state=0).reset_index(drop=True)
    except Exception as e:  # no state folder: synthetic rows of the right shape
        print(f"(no training set: {type(e).__name__}: {e}; using synthetic rows)")
        rng = np.random.default_rng(0)
        return pd.DataFrame(rng.uniform(0, 0.2, (n, len(HEAVY_RANKER_FEATURES))), columns=HEAVY_RANKER_FEATURES)


def _peer_module(rev: str) -> types.ModuleType | None:
    try:
        src = subprocess.run(["git", "show", f"{rev}:models/heavy_ranker.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
    except Exception:
        return None
    mod = types.ModuleType("heavy_ranker_peer")
    sys.modules[mod.__name__] = mod  # dataclasses look their module up there
    exec(compile(src, f"{rev}:models/heavy_ranker.py", "exec"), mod.__dict__)
    return mod


def _fit(model: torch.nn.Module) -> HeavyRankerFit:
    return HeavyRankerFit(model=model.eval(), pos_weight={}, platt={}, epochs=0, best_epoch=0,
                          calibration_loss=float("nan"), fit_rows=0, calibration_rows=0, seconds=0.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads while timing")
    ap.add_argument("--peer-rev", default="e423a36", help="git revision holding the previous (shared-bottom) architecture")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    frame = _rows(args.state, args.rows)
    # a training set built before newer features were added lacks them: time what it has
    names = [f for f in HEAVY_RANKER_FEATURES if f in frame.columns]
    if len(names) < len(HEAVY_RANKER_FEATURES):
        print(f"(training set lacks {len(HEAVY_RANKER_FEATURES) - len(names)} of the schema's features)")
    x = feature_matrix(frame, names)
    norm = InputNormalisation.fit(x, names)
    p = HeavyRankerParams()
    models = {"mmoe+prior+ids (current)": HeavyRankerNet(norm, HEADS, p.hidden, p.tower, p.dropout,
                                                     n_experts=p.n_experts, prior_offset=p.prior_offset)}
    peer = _peer_module(args.peer_rev)
    if peer is not None and not hasattr(peer.HeavyRankerNet, "gate_weights"):
        models[f"shared-bottom 256-128 ({args.peer_rev})"] = peer.HeavyRankerNet(norm, HEADS, (256, 128), 32, 0.1)
    print(f"heavy ranker predict, {len(frame)} rows x {len(names)} features, "
          f"{args.requests} calls, {args.threads} thread(s)")
    for name, model in models.items():
        fit = _fit(model)
        n_params = sum(t.numel() for t in model.parameters())
        t = timings_ms(lambda: fit.predict(frame), args.requests)
        print(f"  {name:<34} params={n_params:>7}  p50={np.percentile(t, 50):6.3f} ms  "
              f"p99={np.percentile(t, 99):6.3f} ms")


if __name__ == "__main__":
    main()
