"""End-to-end latency of ``POST /v1/home-timeline`` through the real HTTP server.

Needs a state folder the demo filled (``make demo`` or ``home-mixer demo``): it starts Redis (if not
running) and the mixer from that state, sends N requests for distinct real users (sequentially, one
client, so each number is a single request's latency), and prints p50/p99 overall and per stage,
with the ratio of the end-to-end p50 to the floor of an HTTP round trip to ``/healthz``.

    .venv/bin/python bench/mixer_latency.py [--requests 100] [--state .state]
"""

from __future__ import annotations

import argparse
import time

import httpx
import numpy as np
import pandas as pd

from home_mixer.demo import start_mixer
from pipelines.training_set import load_training_set
from core.services import RedisServer
from core.state import StateDir


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--state", default=None)
    args = ap.parse_args()
    state = StateDir(__import__("pathlib").Path(args.state).resolve()) if args.state else StateDir.from_env()
    srv = RedisServer.running(state)
    started = None
    if srv is None:
        srv = started = RedisServer(state).start()
    mixer, base = start_mixer(state, srv.url, name="bench-mixer")
    try:
        users = load_training_set(state)["user_id"].drop_duplicates().sample(
            n=args.requests, random_state=7).tolist()
        client = httpx.Client(timeout=30)
        for uid in users[:5]:  # warm-up (model load, connection pools)
            client.post(f"{base}/v1/home-timeline", json={"user_id": int(uid), "limit": 20})
        floor = []
        for _ in range(args.requests):
            t0 = time.perf_counter()
            client.get(f"{base}/healthz")
            floor.append((time.perf_counter() - t0) * 1000)
        total, stages, n_items = [], [], []
        for uid in users:
            t0 = time.perf_counter()
            r = client.post(f"{base}/v1/home-timeline", json={"user_id": int(uid), "limit": 20})
            total.append((time.perf_counter() - t0) * 1000)
            r.raise_for_status()
            body = r.json()
            stages.append(body.get("timings_ms", {}))
            n_items.append(len(body["items"]))
        st = pd.DataFrame(stages)
        print(f"requests: {len(total)} distinct users, page size 20 (mean items {np.mean(n_items):.1f})")
        print(f"{'what':<28} {'p50 ms':>8} {'p99 ms':>8}")
        print(f"{'end to end (HTTP)':<28} {pct(total, 50):8.1f} {pct(total, 99):8.1f}")
        for col in st.columns:
            print(f"{'  stage ' + col:<28} {pct(st[col], 50):8.1f} {pct(st[col], 99):8.1f}")
        print(f"{'floor: GET /healthz':<28} {pct(floor, 50):8.2f} {pct(floor, 99):8.2f}")
        print(f"ratio end-to-end p50 / floor p50: {pct(total, 50) / pct(floor, 50):.1f}x")
    finally:
        mixer.stop()
        if started:
            started.stop()


if __name__ == "__main__":
    main()
