"""End-to-end latency of ``POST /v1/home-timeline`` through the real HTTP server.

Needs a state folder the demo filled (``make demo`` or ``home-mixer demo``): it starts Redis (if not
running) and the mixer from that state, sends N requests for distinct real users (sequentially, one
client, so each number is a single request's latency), and prints p50/p99 overall and per stage,
with the ratio of the end-to-end p50 to the floor of an HTTP round trip to ``/healthz``.

    .venv/bin/python bench/mixer_latency.py [--requests 100] [--state .state]

``--drift-sample``: the drift-sample side effect's cost per request. Three mixers of the same state
and config but ``drift_sample`` (off; on at rate 1.0, so every request pays it; on at the default
0.01) get the same users, interleaved (so load on the machine hits all three alike); prints p50/p99
end to end and of the ``side_effects`` stage for each, and the ratios on/off. The rate-1.0 mixer
writes to the state's ``hm:drift_sample`` stream; those entries are deleted afterwards when the
bench started Redis itself (no other writer), else left (the stream is capped).

``--heavy-backend``: the heavy ranker in torch against ONNX Runtime in process
(``heavy_ranker.backend``), the same way: two mixers, the same users interleaved; prints p50/p99 end
to end and of the ``heavy_ranker`` stage, and the ratios onnx / torch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import yaml

from core import online_layout as keys
from core.services import RedisServer
from core.state import StateDir
from home_mixer.demo import start_mixer
from pipelines.training_set import load_training_set

# (label, drift_sample overrides of the embedded mixer.yaml)
DRIFT_VARIANTS = (("off", {"enabled": False}), ("on, rate 1.0", {"enabled": True, "rate": 1.0}),
                  ("on, rate 0.01", {"enabled": True, "rate": 0.01}))
# (label, heavy_ranker overrides): the first is the peer of the ratios
HEAVY_VARIANTS = (("torch", {"backend": "torch"}), ("onnx", {"backend": "onnx"}))


def pct(values, q) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def timeline(client: httpx.Client, base: str, uid: int) -> tuple[float, dict, int]:
    """One ``POST /v1/home-timeline``: (ms end to end, the response's stage timings, items)."""
    t0 = time.perf_counter()
    r = client.post(f"{base}/v1/home-timeline", json={"user_id": int(uid), "limit": 20})
    ms = (time.perf_counter() - t0) * 1000
    r.raise_for_status()
    body = r.json()
    return ms, body.get("timings_ms", {}), len(body["items"])


def interleaved(state: StateDir, srv: RedisServer, users: list[int], section: str, variants, stage_name: str):
    """One mixer per variant (``{section: overrides}`` over the embedded config), the same users sent
    to each in rotated order (so load on the machine hits all alike): per variant the end-to-end
    milliseconds and the ``stage_name`` stage's."""
    mixers, bases = [], []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for i, (_, overrides) in enumerate(variants):
                path = Path(tmp) / f"variant{i}.yaml"
                path.write_text(yaml.safe_dump({section: overrides}))
                mixer, base = start_mixer(state, srv.url, config=path, name=f"bench-mixer-{section}{i}")
                mixers.append(mixer)
                bases.append(base)
            client = httpx.Client(timeout=30, headers=mixers[0].auth_headers)  # one state: one token
            for base in bases:
                for uid in users[:5]:  # warm-up (model load, connection pools)
                    timeline(client, base, uid)
            total = [[] for _ in variants]
            stage = [[] for _ in variants]
            for n, uid in enumerate(users):
                for k in range(len(variants)):
                    v = (n + k) % len(variants)  # rotate the order: none always goes first
                    ms, timings, _ = timeline(client, bases[v], uid)
                    total[v].append(ms)
                    stage[v].append(timings.get(stage_name, float("nan")))
        finally:
            for mixer in mixers:
                mixer.stop()
    return total, stage


def heavy_backend_cost(state: StateDir, srv: RedisServer, users: list[int]) -> None:
    """The ``--heavy-backend`` mode: torch against ONNX Runtime (see the module doc)."""
    total, stage = interleaved(state, srv, users, "heavy_ranker", HEAVY_VARIANTS, "heavy_ranker")
    print(f"requests: {len(users)} distinct users per variant, interleaved, page size 20")
    print(f"{'heavy_ranker':<16} {'p50 ms':>8} {'p99 ms':>8} {'heavy stage p50':>16} {'p99':>8}")
    for (label, _), t, st in zip(HEAVY_VARIANTS, total, stage):
        print(f"{label:<16} {pct(t, 50):8.2f} {pct(t, 99):8.2f} {pct(st, 50):16.3f} {pct(st, 99):8.3f}")
    print(f"ratio onnx / torch: end to end p50 {pct(total[1], 50) / pct(total[0], 50):.3f}x, "
          f"p99 {pct(total[1], 99) / pct(total[0], 99):.3f}x; heavy stage p50 "
          f"{pct(stage[1], 50) / pct(stage[0], 50):.3f}x, p99 {pct(stage[1], 99) / pct(stage[0], 99):.3f}x")


def drift_sample_cost(state: StateDir, srv: RedisServer, users: list[int], own_redis: bool) -> None:
    """The ``--drift-sample`` mode: p50/p99 with the side effect off and on (see the module doc)."""
    import redis

    r = redis.Redis.from_url(srv.url)
    before = r.xinfo_stream(keys.DRIFT_SAMPLE)["last-generated-id"] if r.exists(keys.DRIFT_SAMPLE) else b"0-0"
    total, stage = interleaved(state, srv, users, "drift_sample", DRIFT_VARIANTS, "side_effects")
    written = r.xrange(keys.DRIFT_SAMPLE, min=f"({_text(before)}", max="+")
    print(f"requests: {len(users)} distinct users per variant, interleaved, page size 20")
    print(f"{'drift_sample':<16} {'p50 ms':>8} {'p99 ms':>8} {'side effects p50':>17} {'p99':>8}")
    for (label, _), t, st in zip(DRIFT_VARIANTS, total, stage):
        print(f"{label:<16} {pct(t, 50):8.2f} {pct(t, 99):8.2f} {pct(st, 50):17.3f} {pct(st, 99):8.3f}")
    for v in (1, 2):
        print(f"ratio {DRIFT_VARIANTS[v][0]} / off: end to end p50 {pct(total[v], 50) / pct(total[0], 50):.3f}x, "
              f"p99 {pct(total[v], 99) / pct(total[0], 99):.3f}x; side effects stage p50 "
              f"{pct(stage[v], 50) - pct(stage[0], 50):+.3f} ms, p99 {pct(stage[v], 99) - pct(stage[0], 99):+.3f} ms")
    if own_redis and written:
        r.xdel(keys.DRIFT_SAMPLE, *[entry_id for entry_id, _ in written])
        print(f"deleted the {len(written)} drift-sample entries the bench wrote")
    elif written:
        print(f"{len(written)} drift-sample entries were written to {keys.DRIFT_SAMPLE} (another writer may "
              "share the stream: left in place)")
    r.close()


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--state", default=None)
    ap.add_argument("--drift-sample", action="store_true",
                    help="compare the drift-sample side effect off / on (rate 1.0) / on (rate 0.01)")
    ap.add_argument("--heavy-backend", action="store_true",
                    help="compare the heavy ranker in torch and in ONNX Runtime (heavy_ranker.backend)")
    args = ap.parse_args()
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()
    srv = RedisServer.running(state)
    started = None
    if srv is None:
        srv = started = RedisServer(state).start()
    if args.drift_sample or args.heavy_backend:
        try:
            users = load_training_set(state)["user_id"].drop_duplicates().sample(
                n=args.requests, random_state=7).tolist()
            if args.drift_sample:
                drift_sample_cost(state, srv, users, own_redis=started is not None)
            else:
                heavy_backend_cost(state, srv, users)
        finally:
            if started:
                started.stop()
        return
    mixer, base = start_mixer(state, srv.url, name="bench-mixer")
    try:
        users = load_training_set(state)["user_id"].drop_duplicates().sample(
            n=args.requests, random_state=7).tolist()
        client = httpx.Client(timeout=30, headers=mixer.auth_headers)
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
