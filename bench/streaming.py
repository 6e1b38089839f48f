"""Stream processor: event->online lag at offered rates, and drain throughput against a bare floor.

Self-contained: starts a redis-server (AOF on, as ``RedisServer`` runs it) on a temporary state
folder, seeds the candidate index's post metadata (``online_layout.POST_META``) from the real videos
(the processor's Lua reads it for post tags), and stops the server at the end, also on Ctrl-C / SIGTERM. Events come from real
KuaiRand-Pure log rows (deduplicated, unknown videos dropped; ~1.8 events per row: impression +
positive labels + follow edge). Consumers run in spawned child processes (own interpreter and GIL).

1. Drain throughput per batch size ``count``: ``LogReplayer`` unpaced (speed 0) pre-fills a stream
   with N events (the producer: build + encode + XADD) and a bare pipelined XADD of the same entries
   gives the producer's floor; then a child drains the stream once per consumer group: XREADGROUP +
   XACK only (``floor_raw``), the bus's ``consume`` + ``ack_many`` (``floor_bus``: adds event
   parsing), and ``StreamProcessor.run_once(count)``; events/s = N / drain seconds, ratio =
   processor / floor. CPU per event of the consumer (Python) and of redis-server (INFO cpu), EVALSHA
   us per call (INFO commandstats) and the CPU other programs took meanwhile (/proc/stat) say where
   the time goes. ``--consumers K`` also drains with K processor processes in one group (events/s
   over the span from the first start to the last finish, and the same CPU split): the scaling
   from 1 to K processes.
2. Event->online lag at offered rates: processor child(ren) run ``StreamProcessor.run(count,
   block_ms=100)`` while this process runs ``LogReplayer`` with ``time_mode="live"`` (events stamped
   with the wall clock at publish). The rows are real but re-timed one log second apart, with
   ``speed`` = rows per wall second, so the offered rate is constant within a step (the log's own
   diurnal curve would swing it several-fold inside one step). Per applied event: ``lag`` = the
   time the processor's write of its batch returned (readers see it from then on) - event time (its
   ``lag_percentiles`` / histogram), and ``publish`` = when the producer's XADD returned - event time (the producer's share). The consumer
   lag (XINFO GROUPS ``lag``) and pending entries are read the moment the producer stops, then the
   time to catch up. A rate ``max`` (``0.8max``) is (a fraction of) the one-processor drain rate.

    .venv/bin/python bench/streaming.py [--rates 200,1000,3000,0.7max,max] [--step-seconds 10]
        [--drain-events 20000] [--counts 10,100,500] [--lag-count 100] [--consumers 2]
        [--lag-consumers 1] [--tick 0.01] [--repeat 1]

The summary's first lines are the headline: the processor's drain rate against the bare consumer
floor of the same run (processor / floor_raw), the K-process scaling, and the CPU per event of the
processor and of redis-server. Defaults take about 1.5 minutes on 2 cores. Redis, the processor(s)
and the producer share the 2 cores; the ``other_cores`` columns show how much CPU other programs
took (numbers from a busy box are lower: compare ratios of one run). Exit code 0, or 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
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

TOPIC = "bench"
LAG_GROUP = "feature-writer"


# ---------------------------------------------------------------- child side (own interpreter)

class _LagTap:
    """Stands in for ``StreamMetrics.lag``: forwards to the real histogram and keeps every sample,
    so percentiles cover all events of a step, not only the processor's last ``lag_window``.

    ``sink`` gets each lag (s): event time -> the return of the batch's write."""

    def __init__(self, hist, sink: list):
        self.hist, self.sink, self._children = hist, sink, {}

    def labels(self, **kw):
        key = tuple(sorted(kw.items()))
        tap = self._children.get(key)
        if tap is None:
            tap = self._children[key] = _LagTapChild(self.hist.labels(**kw), self.sink)
        return tap


class _LagTapChild:
    __slots__ = ("child", "sink")

    def __init__(self, child, sink: list):
        self.child, self.sink = child, sink

    def observe(self, v: float) -> None:
        self.sink.append(v)
        self.child.observe(v)


def _redis_cpu_s(client) -> float:
    """CPU seconds redis-server used so far (all its threads, user + sys)."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine used so far (/proc/stat, all cores), so the CPU
    other programs took during a measurement can be told apart from ours."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def _make_processor(client, bus, group: str, consumer: str, lags: list | None = None):
    from pipelines.streaming.metrics import StreamMetrics
    from pipelines.streaming.processor import StreamProcessor

    metrics = StreamMetrics()
    if lags is not None:
        metrics.lag = _LagTap(metrics.lag, lags)
    return StreamProcessor(client, bus, topic=TOPIC, group=group, consumer=consumer, metrics=metrics)


def _drop_features(client) -> None:
    """Delete the processor's keys (``online_layout.RT_KEY_PATTERNS``), so another processor run
    finds the same events new."""
    from core import online_layout as keys

    for pattern in keys.RT_KEY_PATTERNS:
        batch = []
        for k in client.scan_iter(match=pattern, count=1000):
            batch.append(k)
            if len(batch) == 1000:
                client.unlink(*batch)
                batch = []
        if batch:
            client.unlink(*batch)


def _drain_processor(proc, count: int) -> int:
    """``run_once(count)`` until a call finds nothing new; returns the events handled."""
    done = 0
    while True:
        proc.run_once(count=count, pipelined=True)
        new = sum(proc.stats.values())
        if new == done:
            return done
        done = new


def drain_child(url: str, count: int, groups: list[tuple[str, str]], out) -> None:
    """Drain the ``TOPIC`` stream once per ``(group, kind)``: kind ``raw`` = XREADGROUP + XACK,
    ``bus`` = bus consume + ack_many, ``processor`` = ``run_once(count)``. Puts one dict
    per kind on ``out``: events, secs (wall), cpu_s (this process), redis_s (redis-server CPU),
    busy_s (whole machine CPU), lua_us (EVALSHA usec per call from INFO commandstats), stats."""
    import redis

    from core import online_layout as keys
    from pipelines.streaming.bus import RedisStreamsBus

    client = redis.Redis.from_url(url)
    bus = RedisStreamsBus(client)
    key = keys.event_stream(TOPIC)
    results = []
    for group, kind in groups:
        bus.ensure_group(TOPIC, group)
        proc = None
        if kind == "processor":
            _drop_features(client)
            proc = _make_processor(client, bus, group, f"{group}-c1")
        client.config_resetstat()
        done = 0
        r0, b0, c0, t0 = _redis_cpu_s(client), _machine_busy_s(), time.process_time(), time.perf_counter()
        if kind == "raw":
            while True:
                resp = client.xreadgroup(group, "c1", {key: ">"}, count=count)
                if not resp or not resp[0][1]:
                    break
                ids = [i for i, _ in resp[0][1]]
                client.xack(key, group, *ids)
                done += len(ids)
        elif kind == "bus":
            while True:
                got = bus.consume(TOPIC, group, "c1", count=count)
                if not got:
                    break
                bus.ack_many(got)
                done += len(got)
        else:
            done = _drain_processor(proc, count)
        secs, cpu = time.perf_counter() - t0, time.process_time() - c0
        redis_s, busy = _redis_cpu_s(client) - r0, _machine_busy_s() - b0
        lua = client.info("commandstats").get("cmdstat_evalsha", {}).get("usec_per_call", float("nan"))
        results.append({"kind": kind, "events": done, "secs": secs, "cpu_s": cpu, "redis_s": redis_s,
                        "busy_s": busy, "lua_us": float(lua), "stats": dict(proc.stats) if proc else {}})
    out.put(results)
    client.close()


def consumer_child(url: str, count: int, group: str, consumer: str, barrier, out) -> None:
    """One of several processors of ``group`` draining ``TOPIC`` together: waits at ``barrier``,
    drains, puts ``{events, t0, t1 (time.monotonic, shared by all processes), cpu_s, stats}``."""
    import redis

    from pipelines.streaming.bus import RedisStreamsBus

    client = redis.Redis.from_url(url)
    bus = RedisStreamsBus(client)
    bus.ensure_group(TOPIC, group)
    proc = _make_processor(client, bus, group, consumer)
    barrier.wait()
    t0, c0 = time.monotonic(), time.process_time()
    done = _drain_processor(proc, count)
    out.put({"events": done, "t0": t0, "t1": time.monotonic(), "cpu_s": time.process_time() - c0,
             "stats": dict(proc.stats)})
    client.close()


def lag_child(url: str, count: int, block_ms: int, consumer: str, ready, stop, out) -> None:
    """Run ``StreamProcessor.run`` on ``TOPIC`` as ``consumer`` of ``LAG_GROUP`` until ``stop`` is
    set; put ``{"lags": [lag_s...], "stats": {...}, "window_p50_p99": (s, s), "cpu_s": s}``
    on ``out`` (``window_p50_p99``: the processor's own ``lag_percentiles``, to cross-check the tap)."""
    import redis

    from pipelines.streaming.bus import RedisStreamsBus

    client = redis.Redis.from_url(url)
    bus = RedisStreamsBus(client)
    lags: list[float] = []
    proc = _make_processor(client, bus, LAG_GROUP, consumer, lags)
    proc.run_once(count=count)  # creates the group, does the first reclaim, loads the scripts
    c0 = time.process_time()
    ready.set()
    proc.run(stop, count=count, block_ms=block_ms)
    out.put({"lags": lags, "stats": dict(proc.stats), "window_p50_p99": proc.lag_percentiles(),
             "cpu_s": time.process_time() - c0})
    client.close()


# ---------------------------------------------------------------- parent side

def _post_meta(videos) -> dict[str, str]:
    """The candidate index's post metadata (``keys.POST_META``) as it writes it (``keys.encode_post_meta``)."""
    import pandas as pd

    from core import online_layout as keys

    created = (pd.to_datetime(videos["upload_dt"], errors="coerce").fillna(pd.Timestamp("2022-04-01"))
               .astype("int64") // 10**9)
    out = {}
    for vid, author, c, tags in zip(videos["video_id"], videos["author_id"], created, videos["tag"]):
        tag_ids = [int(t) for t in str(tags).split(",") if t.strip().isdigit()] if isinstance(tags, str) else []
        out[str(int(vid))] = keys.encode_post_meta(int(author), int(c), tag_ids)
    return out


def _reset(client, post_meta: dict[str, str]) -> None:
    """Empty Redis (so event ids are new and no idempotency set turns events into duplicates) and
    re-seed the candidate index's post metadata."""
    from core import online_layout as keys

    client.flushall()
    items = list(post_meta.items())
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(items), 1000):
        pipe.hset(keys.POST_META, mapping=dict(items[i:i + 1000]))
    pipe.execute()


def _run_child(ctx, target, args, timeout_s: float):
    """Run ``target(*args, out)`` in a spawned process; return what it put on ``out``."""
    out = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, out), daemon=True)
    p.start()
    try:
        return out.get(timeout=timeout_s)
    finally:
        p.join(10)
        if p.is_alive():
            p.terminate()


class _Rows:
    """Deduplicated real log rows (known videos only, time-ordered) and their event counts."""

    def __init__(self, log, videos):
        import numpy as np

        from core.schema import RAW_LABEL_COLUMNS
        from pipelines.canonical import deduplicate_log

        dedup, _ = deduplicate_log(log)
        dedup = dedup[dedup["video_id"].isin(videos["video_id"])].sort_values("time_ms", kind="stable")
        self.frame = dedup.reset_index(drop=True)
        author = self.frame["video_id"].map(videos.set_index("video_id")["author_id"]).to_numpy()
        # ReplayEventBuilder: impression + one event per positive label + a follow edge (not to oneself)
        ev = 1 + self.frame[list(RAW_LABEL_COLUMNS)].sum(axis=1).to_numpy()
        ev += ((self.frame["is_follow"].to_numpy() == 1) & (self.frame["user_id"].to_numpy() != author))
        self.cum = np.concatenate([[0], np.cumsum(ev)])
        self.cursor = 0

    def take(self, n_events: int):
        """The next rows holding about ``n_events`` events (wraps to the start when exhausted)."""
        import numpy as np

        if self.cum[-1] - self.cum[self.cursor] < n_events:
            self.cursor = 0
        j = int(np.searchsorted(self.cum, self.cum[self.cursor] + n_events, side="left"))
        j = min(max(j, self.cursor + 1), len(self.frame))
        rows = self.frame.iloc[self.cursor:j].copy()
        self.cursor = j
        return rows


def _drain_step(ctx, url, client, bus, rows, videos, post_meta, count, n, consumers, repeat=1):
    """One batch size: pre-fill, bare XADD, the drains in a child (``repeat`` interleaved rounds,
    the fastest round of each kind kept), then 1 and ``consumers`` processor processes in a group
    of their own each (``_group_drain``, ``repeat`` interleaved rounds, the fastest kept). Returns a
    result row (events/s, CPU per event, ...)."""
    from core import online_layout as keys
    from pipelines.streaming.replay import LogReplayer

    _reset(client, post_meta)
    stats = LogReplayer(bus, topic=TOPIC, speed=0, time_mode="live").replay(rows.take(n), videos)
    n_events = stats.events_published
    row = {"count": count, "events": n_events, "producer_ev_s": n_events / stats.wall_seconds}

    # bare XADD floor of the producer: the same entries, pre-encoded, pipelined 1000 per round trip
    ents = [fields for _, fields in client.xrange(keys.event_stream(TOPIC))]  # = encode_event's output
    bare_key = keys.event_stream(TOPIC + "-xadd")
    t0 = time.perf_counter()
    for i in range(0, len(ents), 1000):
        pipe = client.pipeline(transaction=False)
        for f in ents[i:i + 1000]:
            pipe.xadd(bare_key, f, maxlen=bus.maxlen, approximate=True)
        pipe.execute()
    row["xadd_bare_ev_s"] = len(ents) / (time.perf_counter() - t0)
    client.delete(bare_key)

    groups = [("g-raw", "raw"), ("g-bus", "bus"), ("g-proc", "processor")]
    # Rounds interleave the kinds, so a slow spell of the machine does not land on one kind only.
    groups = [(f"{g}-{i}", k) for i in range(repeat) for g, k in groups]
    best: dict[str, dict] = {}
    for r in _run_child(ctx, drain_child, (url, count, groups), timeout_s=900 * repeat):
        if r["kind"] not in best or r["events"] / r["secs"] > best[r["kind"]]["events"] / best[r["kind"]]["secs"]:
            best[r["kind"]] = r
    for r in best.values():
        kind, done = r["kind"], r["events"]
        if done != n_events:
            raise RuntimeError(f"{kind} drained {done} of {n_events} events ({r['stats']}); the stream or group is off")
        if kind != "raw" and kind != "bus" and r["stats"].get("applied", 0) < 0.99 * n_events:
            raise RuntimeError(f"{kind} applied only {r['stats']} of {n_events}: the events were not new")
        row[f"{kind}_ev_s"] = done / r["secs"]
        row[f"{kind}_cpu_us"] = 1e6 * r["cpu_s"] / done
        row[f"{kind}_redis_us"] = 1e6 * r["redis_s"] / done
        row[f"{kind}_lua_us"] = r["lua_us"]
        row[f"{kind}_other_cores"] = max(0.0, (r["busy_s"] - r["cpu_s"] - r["redis_s"]) / r["secs"])

    if consumers > 1:
        best = {}
        for i in range(repeat):
            for k in (1, consumers):
                r = _group_drain(ctx, url, client, count, n_events, k, f"g-x{k}-{i}")
                if k not in best or r["ev_s"] > best[k]["ev_s"]:
                    best[k] = r
        for k, r in best.items():
            row.update({f"x{k}_{name}": v for name, v in r.items()})
    return row


def _group_drain(ctx, url, client, count: int, n_events: int, k: int, group: str) -> dict:
    """``k`` processor processes drain the stream together in a new group: events/s from the
    first start to the last finish, CPU per event of the processors (summed) and of
    redis-server, and the cores other programs took meanwhile."""
    _drop_features(client)
    barrier, out = ctx.Barrier(k + 1), ctx.Queue()
    procs = [ctx.Process(target=consumer_child, args=(url, count, group, f"c{i}", barrier, out), daemon=True)
             for i in range(k)]
    try:
        for p in procs:
            p.start()
        r0, b0 = _redis_cpu_s(client), _machine_busy_s()
        barrier.wait(timeout=120)
        res = [out.get(timeout=900) for _ in procs]
        redis_s, busy = _redis_cpu_s(client) - r0, _machine_busy_s() - b0
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    done = sum(r["events"] for r in res)
    applied = sum(r["stats"].get("applied", 0) for r in res)
    if done != n_events or applied < 0.99 * n_events:
        raise RuntimeError(f"{k} processors handled {done} / applied {applied} of {n_events} events")
    secs = max(r["t1"] for r in res) - min(r["t0"] for r in res)
    cpu = sum(r["cpu_s"] for r in res)
    return {"ev_s": done / secs, "cpu_us": 1e6 * cpu / done, "redis_us": 1e6 * redis_s / done,
            "other_cores": max(0.0, (busy - cpu - redis_s) / secs)}


class _TimedBus:
    """The producer's bus, recording for every published event the seconds from its ``event_ts``
    (the live stamp) to the moment its XADD round trip returned: the producer's share of the lag."""

    def __init__(self, bus):
        self.bus, self.delays = bus, []

    def publish_many(self, items):
        ids = self.bus.publish_many(items)
        done = time.time()
        self.delays.extend(done - ev.event_ts.timestamp() for _, ev in items)
        return ids

    def __getattr__(self, name):
        return getattr(self.bus, name)


def _lag_step(ctx, url, client, bus, rows, videos, post_meta, rate, seconds, count, tick, consumers):
    """One offered rate: ``consumers`` processor children + a paced live replay here."""
    import numpy as np

    from pipelines.streaming.replay import LogReplayer

    _reset(client, post_meta)
    frame = rows.take(int(rate * seconds))
    # Real rows, re-timed one log second apart: speed = rows per wall second gives a constant rate.
    frame["time_ms"] = int(frame["time_ms"].iloc[0]) + 1000 * np.arange(len(frame), dtype="int64")
    speed = len(frame) / seconds
    stop, out = ctx.Event(), ctx.Queue()
    readies = [ctx.Event() for _ in range(consumers)]
    procs = [ctx.Process(target=lag_child, args=(url, count, 100, f"c{i}", readies[i], stop, out), daemon=True)
             for i in range(consumers)]
    try:
        for p in procs:
            p.start()
        for r in readies:
            if not r.wait(120):
                raise RuntimeError("a processor child did not start within 120 s")
        timed = _TimedBus(bus)
        replayer = LogReplayer(timed, topic=TOPIC, speed=speed, tick_s=tick, time_mode="live")
        r0, b0, c0 = _redis_cpu_s(client), _machine_busy_s(), time.process_time()
        stats = replayer.replay(frame, videos)
        end = bus.backlog(TOPIC, LAG_GROUP)  # consumer lag the moment the producer stops
        t_end = time.monotonic()
        deadline = t_end + max(60.0, 3 * seconds)
        b = end
        while (b.lag or 0) + b.pending > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
            b = bus.backlog(TOPIC, LAG_GROUP)
        catch_up = time.monotonic() - t_end
        redis_s, busy, parent_cpu = _redis_cpu_s(client) - r0, _machine_busy_s() - b0, time.process_time() - c0
        stop.set()
        res = [out.get(timeout=60) for _ in procs]
    finally:
        stop.set()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    lags = np.concatenate([np.asarray(r["lags"], dtype="float64") for r in res]) * 1000.0
    wall = stats.wall_seconds + catch_up
    proc_cpu = sum(r["cpu_s"] for r in res)
    if consumers == 1 and 0 < len(lags) <= 10_000:  # the tap must agree with the processor's own window
        own = np.array(res[0]["window_p50_p99"]) * 1000.0
        if not np.allclose(own, [np.percentile(lags, 50), np.percentile(lags, 99)], rtol=1e-9, atol=1e-9):
            raise RuntimeError(f"tapped lags {np.percentile(lags, [50, 99])} != processor.lag_percentiles {own}")

    def pct(x, q):
        return float(np.percentile(x, q)) if len(x) else float("nan")

    return {
        "offered_ev_s": rate, "achieved_ev_s": stats.events_published / stats.wall_seconds,
        "events": stats.events_published, "applied": sum(r["stats"].get("applied", 0) for r in res),
        "lag_p50_ms": pct(lags, 50), "lag_p99_ms": pct(lags, 99), "lag_max_ms": pct(lags, 100),
        "publish_p50_ms": pct(np.asarray(timed.delays) * 1000.0, 50),
        "publish_p99_ms": pct(np.asarray(timed.delays) * 1000.0, 99),
        "consumer_lag_end": end.lag, "pending_end": end.pending, "catch_up_s": catch_up,
        "producer_cores": parent_cpu / wall, "processor_cores": proc_cpu / wall, "redis_cores": redis_s / wall,
        "other_cores": max(0.0, (busy - parent_cpu - proc_cpu - redis_s) / wall),
    }


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _parse_rates(text: str) -> list[str]:
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            if tok.endswith("max"):
                float(tok[:-3] or 1)
            else:
                assert float(tok) > 0
        except (ValueError, AssertionError):
            raise argparse.ArgumentTypeError(f"bad rate {tok!r}: use events/s > 0 or 'max' / '0.8max'") from None
        out.append(tok)
    return out


def _parse_counts(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad counts {text!r}: comma-separated ints, e.g. 10,100,500") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError("counts must be >= 1")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", type=_parse_rates, default=_parse_rates("200,1000,3000,0.7max,max"),
                    help="offered events/s per lag step; 'max' / '0.8max' = (a fraction of) the drain rate "
                         "of one processor at --lag-count")
    ap.add_argument("--step-seconds", type=float, default=10.0, help="producer duration of each lag step (s)")
    ap.add_argument("--drain-events", type=int, default=20_000, help="events pre-filled per drain")
    ap.add_argument("--counts", type=_parse_counts, default=_parse_counts("10,100,500"),
                    help="run_once(count=...) batch sizes of the drain")
    ap.add_argument("--lag-count", type=int, default=100, help="run(count=...) batch size in the lag steps")
    ap.add_argument("--consumers", type=int, default=2,
                    help="also drain with 1 and with this many processor processes in one group, the scaling (1 = skip)")
    ap.add_argument("--lag-consumers", type=int, default=1, help="processor processes in the lag steps")
    ap.add_argument("--tick", type=float, default=0.01,
                    help="producer pacing tick (s): rows due within it are published together")
    ap.add_argument("--repeat", type=int, default=1,
                    help="drain rounds per batch size (kinds interleaved; the fastest round of each kind is kept)")
    args = ap.parse_args(argv)
    if args.step_seconds <= 0 or args.drain_events < 100 or args.lag_count < 1 or args.tick <= 0:
        ap.error("need --step-seconds > 0, --drain-events >= 100, --lag-count >= 1, --tick > 0")
    if args.consumers < 1 or args.lag_consumers < 1 or args.repeat < 1:
        ap.error("need --consumers >= 1, --lag-consumers >= 1 and --repeat >= 1")

    import pandas as pd
    import redis

    from core.services import RedisServer
    from core.state import StateDir
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.replay import load_replay_inputs

    signal.signal(signal.SIGTERM, _interrupt)  # same way out as Ctrl-C: the finally stops Redis
    ctx = mp.get_context("spawn")  # children get their own interpreter (and GIL), no forked state
    t_start = time.perf_counter()
    load0 = os.getloadavg()[0]
    log, videos = load_replay_inputs()
    rows = _Rows(log, videos)
    post_meta = _post_meta(videos)
    drains, steps = [], []
    with tempfile.TemporaryDirectory(prefix="hm-bench-streaming-") as tmp:
        srv = RedisServer(StateDir(Path(tmp))).start()
        try:
            client = redis.Redis.from_url(srv.url)
            version = client.info("server")["redis_version"]
            bus = RedisStreamsBus(client)
            for count in sorted(set(args.counts) | {args.lag_count}):
                d = _drain_step(ctx, srv.url, client, bus, rows, videos, post_meta, count, args.drain_events,
                                args.consumers, repeat=args.repeat)
                drains.append(d)
                scaling = (f", {args.consumers} processes {d[f'x{args.consumers}_ev_s'] / d['x1_ev_s']:.2f}x one"
                           if args.consumers > 1 else "")
                print(f"drain count={count}: processor {d['processor_ev_s']:.0f} ev/s, floor "
                      f"{d['raw_ev_s']:.0f} ev/s ({d['processor_ev_s'] / d['raw_ev_s']:.3f}x){scaling}", flush=True)
            max_rate = next(d["processor_ev_s"] for d in drains if d["count"] == args.lag_count)
            for tok in args.rates:
                rate = round(float(tok[:-3] or 1) * max_rate if tok.endswith("max") else float(tok))
                s = _lag_step(ctx, srv.url, client, bus, rows, videos, post_meta, rate, args.step_seconds,
                              args.lag_count, args.tick, args.lag_consumers)
                steps.append(s)
                print(f"rate {rate} ev/s: lag p50 {s['lag_p50_ms']:.1f} ms p99 {s['lag_p99_ms']:.1f} ms, "
                      f"consumer lag at end {s['consumer_lag_end']} (+{s['pending_end']} pending)", flush=True)
            client.close()
        except KeyboardInterrupt:
            print("interrupted: stopping Redis", file=sys.stderr)
            return 130
        finally:
            srv.stop()

    def fmt(v: float) -> str:
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"

    pd.set_option("display.width", 250)
    pd.set_option("display.max_columns", 50)
    print(f"\nredis-server {version} (AOF everysec), {os.cpu_count()} cores, 1-min load average before the "
          f"run {load0:.2f}, after {os.getloadavg()[0]:.2f}; real KuaiRand-Pure rows "
          f"({rows.cum[-1] / len(rows.frame):.2f} events per row)")
    print(f"\n1. drain throughput, {args.drain_events} pre-filled events per batch size, best of {args.repeat} "
          "round(s), events/s. floor_raw = "
          "XREADGROUP+XACK only, floor_bus = bus.consume+ack_many (adds event parsing); cpu_us / redis_us = "
          "CPU us per event in the consumer / in redis-server; lua_us = EVALSHA us per call (one per batch, and "
          "the bus's skip_trimmed per read); other_cores = CPU other programs took meanwhile; xK = K processor "
          "processes in one group (a harness of its own: x1 is one process in it)")
    dt = pd.DataFrame(drains).rename(columns={"raw_ev_s": "floor_raw_ev_s", "bus_ev_s": "floor_bus_ev_s"})
    dt["proc/floor_raw"] = dt.processor_ev_s / dt.floor_raw_ev_s
    dt["proc/floor_bus"] = dt.processor_ev_s / dt.floor_bus_ev_s
    cols = ["count", "producer_ev_s", "xadd_bare_ev_s", "floor_raw_ev_s", "floor_bus_ev_s", "processor_ev_s",
            "proc/floor_raw", "proc/floor_bus", "raw_cpu_us", "raw_redis_us", "bus_cpu_us", "processor_cpu_us",
            "processor_redis_us", "processor_lua_us", "processor_other_cores"]
    print(dt[cols].to_string(index=False, float_format=fmt))
    if args.consumers > 1:
        k = args.consumers
        print(f"\n1b. 1 and {k} processor processes in one group, best of {args.repeat} round(s): events/s, CPU us per "
              "event of the processors (summed) and of redis-server, other programs' cores")
        dt[f"x{k}/x1"] = dt[f"x{k}_ev_s"] / dt.x1_ev_s
        mcols = ["count"] + [f"x{n}_{c}" for n in (1, k) for c in ("ev_s", "cpu_us", "redis_us", "other_cores")]
        print(dt[mcols + [f"x{k}/x1"]].to_string(index=False, float_format=fmt))
    print(f"\n2. event->online lag (write time - event time stamped at publish), {args.lag_consumers} processor "
          f"process(es) run(count={args.lag_count}, block_ms=100), live replay {args.step_seconds:g} s per rate, "
          f"tick {args.tick:g} s; consumer lag / pending read when the producer stops; *_cores = CPU cores used")
    st = pd.DataFrame(steps)
    print(st.to_string(index=False, float_format=fmt))

    print("\n3. summary (one run: compare the ratios, the machine's speed varies between runs)")
    d = dt.set_index("count").loc[args.lag_count]
    best = dt.loc[dt.processor_ev_s.idxmax()]
    print(f"  HEADLINE processor / floor_raw, count={args.lag_count}: {d['proc/floor_raw']:.3f} "
          f"({d.processor_ev_s:.0f} ev/s against XREADGROUP+XACK {d.floor_raw_ev_s:.0f} ev/s; "
          f"against the bus floor {d['proc/floor_bus']:.3f})")
    print(f"  CPU per event, one processor: {d.processor_cpu_us:.1f} us in the processor + "
          f"{d.processor_redis_us:.1f} us in redis-server (the bus floor's consumer: {d.bus_cpu_us:.1f} us)")
    if args.consumers > 1:
        k = args.consumers
        print(f"  HEADLINE {k} processes / 1, count={args.lag_count}: {d[f'x{k}/x1']:.2f}x "
              f"({d[f'x{k}_ev_s']:.0f} against {d.x1_ev_s:.0f} ev/s; CPU per event {d[f'x{k}_cpu_us']:.1f} us processors "
              f"+ {d[f'x{k}_redis_us']:.1f} us redis-server, {d[f'x{k}_other_cores']:.2f} cores to other programs)")
    print(f"  producer: LogReplayer unpaced {d.producer_ev_s:7.0f} ev/s, "
          f"bare pipelined XADD {d.xadd_bare_ev_s:7.0f} ev/s")
    print(f"  best single-processor drain: count={int(best['count'])} {best.processor_ev_s:.0f} ev/s "
          f"({best['proc/floor_raw']:.3f}x its floor)")
    kept = st[(st.consumer_lag_end.fillna(0) + st.pending_end) <= 2 * args.lag_count * args.lag_consumers]
    if len(kept):
        k = kept.loc[kept.achieved_ev_s.idxmax()]
        print(f"  highest offered rate kept up with (backlog <= 2 batches when the producer stopped): "
              f"{k.achieved_ev_s:.0f} ev/s, lag p50 {k.lag_p50_ms:.1f} ms p99 {k.lag_p99_ms:.1f} ms")
    for _, s in st.iterrows():
        print(f"  {s.achieved_ev_s:6.0f} ev/s: lag p50 {s.lag_p50_ms:7.1f} ms  p99 {s.lag_p99_ms:7.1f} ms  "
              f"backlog at end {s.consumer_lag_end} + {s.pending_end} pending, caught up in {s.catch_up_s:.2f} s")
    print(f"  whole run {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
