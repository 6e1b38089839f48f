"""Where a home-timeline request spends its time: cProfile over N requests of the real mixer pipeline.

Needs a state folder the demo filled (``make demo``; Redis running: ``home-mixer services start``).
Builds the mixer in this process exactly as a worker does (``mixer.api.open_resources`` with the
embedded config, the champion models and the two-tower), warms it up on 50 users, then profiles
``pipeline.run`` for ``--requests`` distinct real users in sequence (one thread per stage as
configured; cProfile sees the calling thread, so work inside the candidate sources' thread pool shows
as the wait for it). Prints the wall time per request, then the functions with the most own time
(``tottime``) and the most time including callees (``cumtime``), each as ms per request and share of
the wall time. Costs a 2-3x slowdown on the profiled code (cProfile's tracing), so compare shares, not
milliseconds, with ``bench/mixer_latency.py``.

    .venv/bin/python bench/request_profile.py [--state .state] [--requests 500] [--top 25]
"""

from __future__ import annotations

import prometheus_client  # noqa: F401,I001  (before feast: keeps metrics in memory)

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.state import StateDir  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None, help="state folder (default $HOME_MIXER_STATE or .state)")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if args.state:
        os.environ["HOME_MIXER_STATE"] = str(Path(args.state).resolve())
    state = StateDir.from_env()
    from mixer.api import open_resources
    from mixer.config import load_config
    from mixer.metrics import MixerMetrics

    imp = pd.read_parquet(state.table("impressions"), columns=["user_id"])
    users = np.random.default_rng(0).permutation(imp["user_id"].unique())
    if len(users) < args.requests + 50:
        raise SystemExit(f"the log has {len(users)} users; ask for at most {len(users) - 50} requests")
    resources = open_resources(load_config(None), MixerMetrics())
    try:
        pipeline = resources.pipeline
        for uid in users[:50]:
            pipeline.run(int(uid))
        profiler = cProfile.Profile()
        walls = []
        for uid in users[50:50 + args.requests]:
            t0 = time.perf_counter()
            profiler.enable()
            pipeline.run(int(uid))
            profiler.disable()
            walls.append(time.perf_counter() - t0)
    finally:
        resources.close()
    n, wall = len(walls), float(np.sum(walls))
    print(f"{n} requests, wall under the profiler p50 {np.median(walls) * 1e3:.1f} ms, "
          f"p99 {np.quantile(walls, 0.99) * 1e3:.1f} ms, mean {wall / n * 1e3:.1f} ms")
    stats = pstats.Stats(profiler)
    rows = [(func, cc, tt, ct) for func, (cc, _, tt, ct, _) in stats.stats.items()]
    for key, label in ((2, "own time (tottime)"), (3, "time with callees (cumtime)")):
        print(f"\ntop {args.top} by {label}: ms per request, share of wall time, calls per request")
        for func, cc, tt, ct in sorted(rows, key=lambda r: -r[key])[:args.top]:
            file, line, name = func
            where = f"{Path(file).name}:{line}({name})" if line else name
            value = tt if key == 2 else ct
            print(f"  {value / n * 1e3:7.2f} ms {value / wall:6.1%} {cc / n:8.1f}  {where}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
