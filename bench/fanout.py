"""Hybrid fan-out on a large follow graph: write throughput, lag, read latency, the celebrity
threshold's trade-off and memory, against a bare pipelined ``ZADD`` floor in the same run.

Self-contained: starts a redis-server on a temporary state folder, generates a follow graph
(``pipelines.graph.generator``: 1,000,000 users, mean 30 followees by default) or reads one
(``--graph PATH``, a SNAP edge list), loads it (``SocialGraphStore.load_edges``), then:

- **Floor**: the same deliveries as the workers make (one ``ZADD`` per follower, pipelined by
  ``page_size``) for a sample of posts, with nothing else: deliveries/s.
- **Throughput**: ``--posts`` post-created events from authors drawn uniformly from the users with
  followers, published at once, drained by 1 and then 2 real worker processes
  (``FanoutWorker``, one consumer group): deliveries/s and the ratio to the floor (target >= 0.3).
- **Lag**: post events offered at a fixed rate (``--rates``, posts/s) to 2 workers: post created ->
  last follower written, p50/p99 (target p99 <= 1 s at the highest sustained rate).
- **Read latency**: ``HomeTimelineReader.read`` (200 posts, celebrity pulls on) for users following
  0, 10 and 50 celebrities, p50/p99 (target p99 <= 5 ms).
- **Threshold trade-off** at 1k, 10k, 100k followers and none: deliveries per post (write
  amplification, from the graph's in-degrees and the sampled authors), timeline memory (the measured
  bytes per timeline entry x the capped entries), followed celebrities per user (read cost).
- **Memory**: Redis ``used_memory_peak`` and the workers' peak RSS.

    .venv/bin/python bench/fanout.py [--users 1000000] [--mean-followees 30] [--graph PATH]
                                     [--posts 3000] [--rates 100 300 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GROUP_PREFIX = "bench"
# Twitter-scale posting rate of the capacity model (issue 20): 500M posts a day from 300M daily users
POSTS_PER_USER_DAY = 500 / 300


def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def _worker(url: str, group: str, threshold: int, stop_when_idle: bool, out, seconds: float) -> None:
    """A worker process: consume the post topic, fan out, report (deliveries, lags, max RSS)."""
    import redis

    from pipelines.graph.config import FanoutSettings
    from pipelines.graph.fanout import FanoutWorker
    from pipelines.streaming.bus import RedisStreamsBus

    client = redis.Redis.from_url(url)
    settings = FanoutSettings(celebrity_threshold=threshold, group=group)
    worker = FanoutWorker(client, RedisStreamsBus(client), settings, consumer=f"w{os.getpid()}")
    worker.bus.ensure_group(settings.post_topic, group)
    out.put("ready")  # start-up (imports, connections) is not measured
    lags, idle, last, end = [], 0, time.time(), time.monotonic() + seconds
    while time.monotonic() < end:
        batch = worker.bus.consume(settings.post_topic, group, worker.consumer, count=50, block_ms=200)
        if not batch:
            idle += 1
            if stop_when_idle and idle >= 3:
                break
            continue
        idle = 0
        worker.process(batch)  # as the worker's own loop: small posts batched, the rest page by page
        last = time.time()
        lags += [last - d.event.event_ts.timestamp() for d in batch]
    text = worker.metrics.render().decode()  # this process's deliveries counter
    delivered = int(float(next(line.split()[-1] for line in text.splitlines()
                               if line.startswith("hm_fanout_deliveries_total "))))
    out.put((delivered, lags, _peak_rss_mb(), last))


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM, MB). Not ``ru_maxrss``: it survives exec, so a
    spawned child would report its parent's size from the moment between fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _start(ctx, n: int, args: tuple) -> tuple[list, object]:
    """``n`` worker processes, returned once each has said it is ready."""
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(*args[:4], out, args[4])) for _ in range(n)]
    for p in procs:
        p.start()
    for _ in procs:
        assert out.get(timeout=120) == "ready"
    return procs, out


def _events(authors: np.ndarray, start_id: int, now: float | None = None):
    from pipelines.streaming.events import PostCreatedEvent

    ts = datetime.fromtimestamp(now or time.time(), tz=timezone.utc)
    return [PostCreatedEvent(event_id=f"bench-post-{start_id + i}", event_ts=ts, post_id=start_id + i,
                             author_id=int(a)) for i, a in enumerate(authors)]


def _drain(ctx, url: str, bus, authors: np.ndarray, start_id: int, workers: int, threshold: int, tag: str) -> dict:
    """Publish one post per author at once, drain with ``workers`` processes: deliveries/s."""
    group = f"{GROUP_PREFIX}-{tag}"
    procs, out = _start(ctx, workers, (url, group, threshold, True, 600.0))
    t0 = time.time()
    bus.publish_many([("posts", e) for e in _events(authors, start_id)])
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    wall = max(r[3] for r in results) - t0  # publish -> the last worker's last delivery
    delivered = sum(r[0] for r in results)
    return {"delivered": delivered, "seconds": wall, "per_s": delivered / wall, "rss_mb": max(r[2] for r in results)}


def _floor(client, follower_lists: list[list[int]], page_size: int) -> float:
    """Bare pipelined ZADD of the same deliveries, pages of ``page_size``: deliveries/s."""
    from core import online_layout as keys

    n, t0 = 0, time.perf_counter()
    for post, followers in enumerate(follower_lists):
        member = keys.encode_timeline_entry(10**12 + post, 1)
        for i in range(0, len(followers), page_size):
            pipe = client.pipeline(transaction=False)
            for f in followers[i:i + page_size]:
                pipe.zadd(keys.home_timeline(f), {member: 1.0})
            pipe.execute()
            n += len(followers[i:i + page_size])
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--mean-followees", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--graph", default=None, help="SNAP edge list (follower followee per line) instead of a generated graph")
    ap.add_argument("--posts", type=int, default=3000, help="posts of the throughput drains")
    ap.add_argument("--rates", type=float, nargs="*", default=[100.0, 300.0, 1000.0], help="offered posts/s of the lag runs")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each lag run")
    ap.add_argument("--threshold", type=int, default=10_000, help="celebrity threshold of the runs")
    args = ap.parse_args(argv)

    import redis

    from core import online_layout as keys
    from core.services import RedisServer
    from core.state import StateDir
    from pipelines.graph.config import FanoutSettings
    from pipelines.graph.edges import read_edge_list
    from pipelines.graph.generator import generate_follow_graph
    from pipelines.graph.store import SocialGraphStore
    from pipelines.graph.timeline import HomeTimelineReader
    from pipelines.streaming.bus import RedisStreamsBus

    ctx = mp.get_context("spawn")
    page = FanoutSettings().page_size
    t0 = time.perf_counter()
    if args.graph:
        follower, followee = read_edge_list(args.graph)
        source = args.graph
    else:
        g = generate_follow_graph(args.users, args.mean_followees, seed=args.seed)
        follower, followee = g.follower, g.followee
        source = f"generated: {args.users:,} users, mean {args.mean_followees:g} followees, seed {args.seed}"
    n_users = int(max(follower.max(), followee.max())) + 1
    in_deg = np.bincount(followee, minlength=n_users)
    out_deg = np.bincount(follower, minlength=n_users)
    print(f"graph: {source}; {len(follower):,} edges, max followers {in_deg.max():,}, median "
          f"{int(np.median(in_deg))}, built in {time.perf_counter() - t0:.0f} s", flush=True)
    rng = np.random.default_rng(args.seed + 1)
    with tempfile.TemporaryDirectory(prefix="hm-bench-fanout-") as tmp:
        srv = RedisServer(StateDir(Path(tmp))).start()
        try:
            client = redis.Redis.from_url(srv.url)
            store = SocialGraphStore(client)
            t0 = time.perf_counter()
            store.load_edges(follower, followee)
            base_mem = client.info("memory")["used_memory"]
            print(f"graph loaded into Redis in {time.perf_counter() - t0:.0f} s ({base_mem / 2**20:.0f} MB)", flush=True)
            bus = RedisStreamsBus(client)
            posting = np.flatnonzero(in_deg > 0)
            authors = rng.choice(posting, size=args.posts)
            pushed = authors[in_deg[authors] <= args.threshold]

            # floor: the same deliveries, bare
            sample = pushed[: max(1, len(pushed) // 3)]
            lists = [[int(x) for x in client.smembers(keys.graph_followers(int(a)))] for a in sample]
            floor = _floor(client, lists, page)
            for i in range(len(lists)):  # leave the timelines as they were
                pipe = client.pipeline(transaction=False)
                for f in lists[i]:
                    pipe.zrem(keys.home_timeline(f), keys.encode_timeline_entry(10**12 + i, 1))
                pipe.execute()
            print(f"floor (bare pipelined ZADD): {floor:,.0f} deliveries/s over {sum(map(len, lists)):,}", flush=True)

            drains = {}
            for workers in (1, 2):
                d = _drain(ctx, srv.url, bus, authors, 10**9 * workers, workers, args.threshold, f"drain{workers}")
                drains[workers] = d
                print(f"{workers} worker(s): {d['per_s']:,.0f} deliveries/s ({d['per_s'] / floor:.2f}x floor), "
                      f"{d['delivered']:,} in {d['seconds']:.1f} s, worker RSS {d['rss_mb']:.0f} MB", flush=True)

            # lag at offered rates, 2 workers
            lag_rows = []
            for i, rate in enumerate(args.rates):
                group = f"{GROUP_PREFIX}-lag{i}"
                client.xtrim(keys.event_stream("posts"), maxlen=0)
                procs, out = _start(ctx, 2, (srv.url, group, args.threshold, False, args.seconds + 3))
                n = int(rate * args.seconds)
                chosen = rng.choice(posting, size=n)
                t_start = time.perf_counter()
                for j, a in enumerate(chosen):
                    due = t_start + j / rate
                    delay = due - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    bus.publish("posts", _events(np.array([a]), 2 * 10**9 + i * 10**7 + j)[0])
                sent_rate = n / (time.perf_counter() - t_start)
                results = [out.get() for _ in procs]
                for p in procs:
                    p.join()
                lags = [x for r in results for x in r[1]]
                lag_rows.append((rate, sent_rate, len(lags), n, pct(lags, 50) * 1e3, pct(lags, 99) * 1e3))
                print(f"lag at {rate:g} posts/s (sent {sent_rate:.0f}/s): {len(lags)}/{n} fanned out, p50 "
                      f"{pct(lags, 50) * 1e3:.1f} ms, p99 {pct(lags, 99) * 1e3:.1f} ms", flush=True)

            # read latency for users following 0, 10, 50 celebrities
            celebs = np.argsort(-in_deg)[:50]
            pipe = client.pipeline(transaction=False)
            for c in celebs:
                for k in range(20):
                    pipe.zadd(keys.user_posts(int(c)), {keys.encode_timeline_entry(3 * 10**9 + int(c) * 20 + k, int(c)):
                                                        time.time() - k})
                pipe.zadd(keys.FANOUT_CELEBRITIES, {str(int(c)): int(in_deg[c])})
            pipe.execute()
            reader = HomeTimelineReader(client)
            readers = np.flatnonzero(out_deg > 0)
            read_rows = []
            for n_celebs in (0, 10, 50):
                users = rng.choice(readers, size=300, replace=False)
                pipe = client.pipeline(transaction=False)
                for u in users:
                    if n_celebs:
                        pipe.sadd(keys.graph_followees(int(u)), *[str(int(c)) for c in celebs[:n_celebs]])
                pipe.execute()
                times = []
                for u in users:
                    t = time.perf_counter()
                    reader.read(int(u), 200, max_celebrity_pulls=50, cleanup=False)
                    times.append(time.perf_counter() - t)
                read_rows.append((n_celebs, pct(times, 50) * 1e3, pct(times, 99) * 1e3))
                print(f"read, {n_celebs} followed celebrities: p50 {pct(times, 50) * 1e3:.2f} ms, "
                      f"p99 {pct(times, 99) * 1e3:.2f} ms", flush=True)

            # the threshold's trade-off: from the graph and the measured bytes per timeline entry
            timelines = client.dbsize()
            mem = client.info("memory")
            sampled_users = rng.choice(n_users, 2000)
            entries = sum(client.zcard(keys.home_timeline(int(u))) for u in sampled_users)
            entry_bytes = max(mem["used_memory"] - base_mem, 1) / max(entries / len(sampled_users) * n_users, 1)
            print(f"\nthreshold trade-off: every user posts {POSTS_PER_USER_DAY:.2f} posts/day (500M posts / 300M "
                  f"daily users); {entry_bytes:.0f} B per timeline entry (measured); timelines capped at 800")
            print(f"{'threshold':>10} {'celebrities':>12} {'deliveries/post':>16} {'entries/user/day':>17} "
                  f"{'timelines after 7 d':>20} {'celebrities followed p50/p99':>29}")
            for thr in (1_000, 10_000, 100_000, None):
                celeb = np.zeros(n_users, bool) if thr is None else in_deg > thr
                pushed_followees = np.bincount(follower[~celeb[followee]], minlength=n_users)
                followed_celebs = np.bincount(follower[celeb[followee]], minlength=n_users)
                per_post = np.where(celeb, 0, in_deg).mean() + 1  # + the author's own timeline
                per_day = pushed_followees * POSTS_PER_USER_DAY
                week_gb = np.minimum(7 * per_day, 800).sum() * entry_bytes / 1e9
                print(f"{'none' if thr is None else f'{thr:,}':>10} {int(celeb.sum()):>12,} {per_post:>16.1f} "
                      f"{per_day.mean():>17.1f} {week_gb:>17.2f} GB "
                      f"{int(np.percentile(followed_celebs, 50)):>15} / {int(np.percentile(followed_celebs, 99))}")
            print(f"\nmemory: Redis used_memory_peak {mem['used_memory_peak'] / 2**20:.0f} MB ({timelines:,} keys); "
                  f"worker peak RSS {max(d['rss_mb'] for d in drains.values()):.0f} MB")
            print(f"targets: 2 workers {drains[2]['per_s'] / floor:.2f}x floor (>= 0.3); lag p99 at "
                  f"{lag_rows[-1][0]:g} posts/s {lag_rows[-1][5]:.0f} ms (<= 1000); read p99 with 50 celebrities "
                  f"{read_rows[-1][2]:.2f} ms (<= 5)")
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
