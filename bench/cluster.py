"""The online store as a Redis Cluster vs one Redis, in one run (issue 21, must-have 2's bench).

Self-contained on the real KuaiRand-Pure data (``--data``); everything is started in temporary
state folders and stopped at the end (also on Ctrl-C / SIGTERM):

1. **Mixer latency.** A single ``redis-server`` (``RedisServer``) and a local cluster of 3 primaries
   + 3 replicas (``RedisCluster``, ``home-mixer services start --cluster 3``) get the same online
   store: the candidate index (``build_candidate_index``), tiny real rankers trained once on the dev
   frame (registered in one MLflow that both mixers load by alias) and the Feast features of
   ``--users`` real users (``FeatureStore.write_to_online_store``: ``redis_type: redis`` vs
   ``redis_cluster``). Two mixers (one worker each), one per store, answer ``--requests``
   ``POST /v1/home-timeline`` each over the same random users, interleaved one by one (so load on
   the machine hits both alike), after a warm-up; prints p50 / p99 end to end, the p50 of each
   stage the response times, and the ratio cluster / single (issue 21's target: p99 <= 1.2x).
2. **Stream-processor throughput** with 1 shard (the single Redis) and 3 shards (the cluster):
   ``--events`` real replay events (``ReplayEventBuilder``: impression + positive labels + follow
   edge per log row) pre-filled into the bus's stream, then drained by one in-process
   ``StreamProcessor.run_once(count=--count)``; events/s = events / drain seconds. On the cluster a
   batch is one ``engagement_batch.lua`` call per hash tag (global, post, author, user parts), on
   one Redis one call per batch; the ratio says what the split costs on one machine (the cluster's
   point is capacity across machines, which one 2-core box cannot show).

    .venv/bin/python bench/cluster.py [--requests 200] [--users 300] [--events 20000] [--count 100]

Redis (1 or 6 processes), the mixers, the processor and this client share the machine's cores:
compare the ratios of one run, not absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder comes first on sys.path and bench/serving.py would shadow the
# project's `serving` package.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._served_store import AS_OF, add_store_arguments, canonical_tables, train_rankers, write_features  # noqa: E402


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def pct(values, q) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=float), q))


def mixer_latency(args, tmp: Path, stores: dict[str, tuple]) -> dict[str, dict]:
    """Part 1: fill both stores, start a mixer on each, time interleaved requests."""
    import httpx
    import yaml

    from home_mixer.demo import start_mixer
    from pipelines.candidate_index import build_candidate_index

    t0 = time.perf_counter()
    tables = canonical_tables(Path(args.data))
    models = stores["single"][0]
    frame = train_rankers(Path(args.data), models)
    counts = frame.groupby("user_id").size().sort_values(ascending=False)
    users = [int(u) for u in counts.index[:args.users]]
    for name, (state, address) in stores.items():
        build_candidate_index(state, address, AS_OF, tables=tables)
        write_features(frame, users, state, address)
    print(f"stores filled in {time.perf_counter() - t0:.0f} s ({len(users)} users' features)", flush=True)
    mixers, out = {}, {}
    try:
        for name, (state, address) in stores.items():
            config = tmp / f"mixer-{name}.yaml"
            config.write_text(yaml.safe_dump({"models": {"tracking_uri": models.mlflow_tracking_uri},
                                              "clock": {"now": AS_OF}}))
            srv, base = start_mixer(state, address, config=config, name=f"bench-cluster-{name}", timeout_s=300)
            mixers[name] = (srv, base, {"Authorization": f"Bearer {srv.token}"})
        rng = random.Random(7)
        times = {name: [] for name in mixers}
        stages = {name: {} for name in mixers}  # stage -> ms per request (the response's timings_ms)
        degraded = {name: 0 for name in mixers}
        with httpx.Client(timeout=30) as http:
            for i in range(args.warmup + args.requests):
                uid = rng.choice(users)
                for name in (sorted(mixers) if i % 2 else sorted(mixers, reverse=True)):  # alternate who goes first
                    _, base, headers = mixers[name]
                    t = time.perf_counter()
                    r = http.post(f"{base}/v1/home-timeline", json={"user_id": uid, "limit": 20}, headers=headers)
                    ms = (time.perf_counter() - t) * 1000
                    r.raise_for_status()
                    body = r.json()
                    if i >= args.warmup:
                        degraded[name] += bool(body.get("degraded"))
                        times[name].append(ms)
                        for s, v in body.get("timings_ms", {}).items():
                            if isinstance(v, (int, float)):
                                stages[name].setdefault(s, []).append(v)
        for name in mixers:
            out[name] = {"p50": pct(times[name], 50), "p99": pct(times[name], 99), "degraded": degraded[name],
                         "stages": {s: pct(v, 50) for s, v in stages[name].items()}}
    finally:
        for srv, _, _ in mixers.values():
            srv.stop()
    return out


def stream_throughput(args, stores: dict[str, tuple]) -> dict[str, float]:
    """Part 2: drain ``--events`` replay events per store with one processor; events/s."""
    from core import online_layout as keys
    from core.online_store import connect
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.processor import StreamProcessor
    from pipelines.streaming.replay import ReplayEventBuilder, ReplayRowsBuilder, load_replay_inputs

    log, videos = load_replay_inputs(data_dir=args.data)
    rows = ReplayRowsBuilder().build(log, videos, limit=args.events)
    builder = ReplayEventBuilder()
    events = [e for i in range(len(rows)) for e in builder.events(rows, i)][:args.events]
    meta = {str(int(v)): keys.encode_post_meta(int(a), 0, []) for v, a in zip(videos["video_id"], videos["author_id"])}
    out = {}
    for name, (_, address) in stores.items():
        client = connect(address)
        for k in keys.RT_KEY_PATTERNS:  # the mixer part's processor-free store: start from no real-time state
            for key in client.scan_iter(match=k, count=10_000):
                client.unlink(key)
        items = list(meta.items())
        for i in range(0, len(items), 5000):
            client.hset(keys.POST_META, mapping=dict(items[i:i + 5000]))
        bus = RedisStreamsBus(client, maxlen=len(events) + 1000)
        topic = "bench-cluster"
        for i in range(0, len(events), 1000):
            bus.publish_many([(topic, e) for e in events[i:i + 1000]])
        proc = StreamProcessor(client, bus, topic=topic, group="bench", consumer="bench-1", stamp_every_s=0.1)
        t = time.perf_counter()
        applied = 0
        while sum(proc.stats.values()) < len(events):  # every event applied, a duplicate or skipped
            applied += proc.run_once(count=args.count)
            if time.perf_counter() - t > 900:
                raise SystemExit(f"stream {name}: {dict(proc.stats)} of {len(events)} events after 900 s")
        seconds = time.perf_counter() - t
        out[name] = len(events) / seconds
        print(f"stream {name}: {len(events)} events ({applied} applied now) in {seconds:.1f} s: "
              f"{out[name]:.0f} events/s", flush=True)
        client.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_store_arguments(ap, requests=200)
    ap.add_argument("--events", type=int, default=20_000, help="replay events drained per store")
    ap.add_argument("--count", type=int, default=100, help="the processor's batch (run_once count)")
    ap.add_argument("--skip-mixer", action="store_true", help="only the stream part")
    args = ap.parse_args(argv)
    if args.requests < 10 or args.users < 1 or args.events < 100 or args.count < 1:
        ap.error("need --requests >= 10, --users >= 1, --events >= 100, --count >= 1")

    from core.services import RedisCluster, RedisServer
    from core.state import StateDir

    signal.signal(signal.SIGTERM, _interrupt)  # same way out as Ctrl-C: the finally stops the servers
    started = []
    with tempfile.TemporaryDirectory(prefix="hm-bench-cluster-") as tmp:
        try:
            single_state = StateDir(Path(tmp) / "single").ensure()
            cluster_state = StateDir(Path(tmp) / "cluster").ensure()
            single = RedisServer(single_state).start()
            started.append(single)
            cluster = RedisCluster(cluster_state, shards=3).start()
            started.append(cluster)
            stores = {"single": (single_state, single.url), "cluster": (cluster_state, cluster.address)}
            print(f"single Redis {single.url}; cluster {cluster.address} (ready in {cluster.started_seconds:.1f} s)",
                  flush=True)
            latency = None if args.skip_mixer else mixer_latency(args, Path(tmp), stores)
            throughput = stream_throughput(args, stores)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            for srv in reversed(started):
                srv.stop()
    print("\n== Redis Cluster (3 primaries + 3 replicas) vs one Redis, one run ==")
    if latency is not None:
        s, c = latency["single"], latency["cluster"]
        print(f"mixer latency over {args.requests} requests each (ms): single p50 {s['p50']:.1f} p99 {s['p99']:.1f}; "
              f"cluster p50 {c['p50']:.1f} p99 {c['p99']:.1f}; cluster/single p50 {c['p50'] / s['p50']:.2f}x, "
              f"p99 {c['p99'] / s['p99']:.2f}x (target <= 1.2x); degraded answers: single {s['degraded']}, "
              f"cluster {c['degraded']}")
        for st in sorted(s["stages"].keys() | c["stages"].keys()):
            print(f"  stage {st} p50 (ms): single {s['stages'].get(st, float('nan')):.2f}, "
                  f"cluster {c['stages'].get(st, float('nan')):.2f}")
    print(f"stream processor (count={args.count}): 1 shard {throughput['single']:.0f} events/s, 3 shards "
          f"{throughput['cluster']:.0f} events/s ({throughput['cluster'] / throughput['single']:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
