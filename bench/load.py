"""The mixer under load: throughput and latency at rising concurrency, driven by Debian's ``wrk``.

Needs a state folder the demo filled (``make demo``). Starts Redis (if not running) and a mixer with
``--workers`` processes from that state, then:

- **Closed loop** (``--concurrency``, 1 2 4 8 16 connections by default): for each level, ``wrk``
  runs ``--duration`` seconds with a Lua script that posts home-timeline requests for real user
  ids of the log (round robin from a random start per connection), and the same concurrency
  against ``GET /healthz`` (the floor: HTTP and the server loop, no ranking). Prints requests/s,
  p50/p95/p99 (ms, every answer), non-2xx answers (503 = refused at the in-flight bound), the
  admitted requests' pipeline p99 from the mixer's own ``hm_mixer_request_seconds`` histogram
  (server side, interpolated; the wait for an execution slot comes on top), the quality factor
  the responses reported last, the serving side's CPU per 2xx answer (``cpu ms``: mixer processes
  and Redis, user + system; steadier than latency on a shared machine, and it bounds throughput:
  2 cores / cpu ms), and each worker's memory (RSS, MB). A closed loop sends the next
  request the moment an answer arrives, so past the in-flight bound each instant 503 becomes
  another request at once: a retry storm no caller that honours ``Retry-After`` makes.
- **Open loop** (``--rate``, offered requests/s): every connection sends on its own Poisson
  schedule whatever the answers take, and a refusal is not retried, the way the feed service's
  traffic arrives. Prints the rate sent, admitted (2xx) and refused per second, and the admitted
  requests' p50/p95/p99/max measured client side. "2x the sustainable load" is an open-loop level.

- **Front door** (``--front-door haproxy --replicas N``): the same levels against N one-worker
  mixer replicas behind HAProxy (``mixer.front_door.MixerFrontDoor``: each replica gets at most
  ``front_door.maxconn_per_replica`` requests, the rest queue in HAProxy), instead of one mixer
  whose workers the kernel balances. CPU counts HAProxy and every replica; the pipeline p99 sums
  every replica's histogram. Then the **kill** phase (``--kill-rate``, default 20 requests/s, open
  loop): replica 1 is SIGKILLed a third of the way in; every failed request the clients saw is
  counted (non-2xx, socket errors, timeouts), with HAProxy's retries and redispatches from its
  exporter. Last, the targets of issue 21 with the measured values.

Every level prints Little's law, ``L = X x W``: requests in the system (L) = throughput (X,
answers/s) x mean latency (W, s). In a closed loop L is the connection count, so the latency a
level can have is fixed by its throughput (8 connections at 55 answers/s: W = 8 / 55 = 145 ms on
average); in an open loop L is the mean number of requests in flight (queued or served).

The load generator runs on the same machine, as the target says ("on 2 cores, load generator
included").

    .venv/bin/python bench/load.py [--state .state] [--workers 2] [--duration 15] [--concurrency 1 2 4 8 16]
                                   [--rate 20 40 80] [--front-door haproxy --replicas 2 [--kill-rate 20]]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil
import redis

from core import online_layout as keys
from core.services import RedisServer
from core.state import StateDir
from home_mixer.demo import start_mixer
from pipelines.training_set import load_training_set

LUA = r"""
local users = {}
for line in io.lines("%(users)s") do users[#users + 1] = line end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  idx = math.random(#users); non2xx = 0; refused = 0; qf = -1
end
function request()
  if "%(method)s" == "GET" then return wrk.format("GET", "%(path)s") end
  idx = idx %% #users + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"%(auth)s},
                    '{"user_id": ' .. users[idx] .. ', "limit": 20}')
end
function response(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
  if status == 503 then refused = refused + 1 end
  local q = string.match(body, '"quality_factor":%%s*([%%d%%.]+)')
  if q then qf = tonumber(q) end
end
function done(summary, latency, requests)
  local n, r, q = 0, 0, -1
  for _, t in ipairs(threads) do n = n + t:get("non2xx"); r = r + t:get("refused"); q = math.max(q, t:get("qf")) end
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p95_us": %%d, ' ..
    '"p99_us": %%d, "mean_us": %%f, "non2xx": %%d, "refused": %%d, "socket_errors": %%d, "timeouts": %%d, "qf": %%f}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.mean, n, r, e.connect + e.read + e.write, e.timeout, q))
end
"""


# Open loop (``--rate``): every connection sends on its own Poisson schedule whatever the answers
# take, so refusals are not retried at once (a closed loop turns each 503 into another request at
# once: a retry storm the real feed service would not make) and the offered rate stays fixed. wrk
# runs one thread (one Lua state) per connection here, so the schedule and the send time are per
# connection. The
# clock is LuaJIT's FFI gettimeofday (wrk's Lua has no millisecond clock). Admitted latency
# (2xx answers only) is timed here, send to last byte, in 1 ms buckets.
OPEN_LUA = r"""
local ffi = require("ffi")
ffi.cdef[[ typedef struct { long tv_sec; long tv_usec; } hm_timeval; int gettimeofday(hm_timeval *tv, void *tz); ]]
local tv = ffi.new("hm_timeval")
local function now_ms() ffi.C.gettimeofday(tv, nil); return tonumber(tv.tv_sec) * 1000 + tonumber(tv.tv_usec) / 1000 end
local users = {}
for line in io.lines("%(users)s") do users[#users + 1] = line end
local threads = {}
local interval_ms = %(interval_ms)f  -- mean gap between one connection's sends
function setup(thread) table.insert(threads, thread); thread:set("id", #threads) end
function init(args)
  -- each thread's Lua state starts with the same seed: unseeded, all connections would send in step
  math.randomseed(id * 7919 + math.floor(now_ms()))
  idx = math.random(#users); non2xx = 0; refused = 0; qf = -1; late = 0; sent_n = 0
  hist = {}; for i = 0, 5000 do hist[i] = 0 end
  next_ms = now_ms() + math.random() * interval_ms; sent_at = 0
end
function delay()
  local gap = -math.log(1 - math.random()) * interval_ms
  next_ms = next_ms + gap
  local d = next_ms - now_ms()
  if d < 0 then late = late + 1; next_ms = now_ms(); return 0 end
  return d
end
function request()
  idx = idx %% #users + 1
  sent_at = now_ms(); sent_n = sent_n + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"%(auth)s},
                    '{"user_id": ' .. users[idx] .. ', "limit": 20}')
end
function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if status == 503 then refused = refused + 1 end
    return
  end
  local ms = math.min(5000, math.floor(now_ms() - sent_at))
  hist[ms] = hist[ms] + 1
  local q = string.match(body, '"quality_factor":%%s*([%%d%%.]+)')
  if q then qf = tonumber(q) end
end
function done(summary, latency, requests)
  local n, r, q, l, s = 0, 0, -1, 0, 0
  local h = {}; for i = 0, 5000 do h[i] = 0 end
  for _, t in ipairs(threads) do
    n = n + t:get("non2xx"); r = r + t:get("refused"); q = math.max(q, t:get("qf")); l = l + t:get("late")
    s = s + t:get("sent_n")
    local th = t:get("hist"); for i = 0, 5000 do h[i] = h[i] + (th[i] or 0) end
  end
  local parts = {}
  for i = 0, 5000 do if h[i] > 0 then parts[#parts + 1] = string.format('"%%d": %%d', i, h[i]) end end
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "sent": %%d, "duration_us": %%d, "non2xx": %%d, "refused": %%d, ' ..
    '"socket_errors": %%d, "timeouts": %%d, "qf": %%f, "late": %%d, "admitted_ms": {%%s}}\n',
    summary.requests, s, summary.duration, n, r, e.connect + e.read + e.write, e.timeout, q, l,
    table.concat(parts, ", ")))
end
"""


def open_lua(users_file: Path, path: str, token: str | None, rate: float, connections: int) -> str:
    """The open-loop script: ``connections`` connections, each on a Poisson schedule of mean rate
    ``rate / connections`` requests/s."""
    auth = f', ["Authorization"] = "Bearer {token}"' if token else ""
    return OPEN_LUA % {"users": users_file, "path": path, "auth": auth,
                       "interval_ms": 1000.0 * connections / rate}


def histogram_quantiles(counts_by_ms: dict[str, int], qs: tuple[float, ...]) -> list[float]:
    """Quantiles (ms) of a ``{"<ms>": count}`` histogram of 1 ms buckets (upper edge); NaN if empty."""
    if not counts_by_ms:
        return [float("nan")] * len(qs)
    ms = np.array(sorted(int(k) for k in counts_by_ms))
    n = np.array([counts_by_ms[str(k)] for k in ms])
    cum = np.cumsum(n)
    return [float(ms[np.searchsorted(cum, q * cum[-1])] + 1) for q in qs]


def run_wrk(url: str, script: Path, connections: int, duration_s: int, threads: int = 1) -> dict:
    """One wrk run; its RESULT line. Closed loop: 1 thread (the generator must leave the cores to
    the mixer). Open loop: a thread per connection, because wrk's Lua state is per thread and the
    open-loop script keeps a schedule and a send time per connection (the threads sleep in epoll).

    Raises:
        RuntimeError: wrk printed no result (its output is in the message).
    """
    machine0, wrk0, wall0 = machine_busy_s(), children_cpu_s(), time.monotonic()
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
                          "-s", str(script), url], capture_output=True, text=True, check=False)
    m = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r.update(machine_cpu_s=machine_busy_s() - machine0, wrk_cpu_s=children_cpu_s() - wrk0,
             wall_s=time.monotonic() - wall0)
    return r


def machine_busy_s() -> float:
    """CPU seconds all cores of this machine spent busy so far (``/proc/stat``: everything but idle
    and iowait), whoever used them."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children (the wrk runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def others_cores(r: dict, serving_cpu_s: float) -> float:
    """Cores other processes of the machine used during a wrk run (neither the serving side nor
    wrk): the noise of a shared machine, printed with each level."""
    return max(0.0, r["machine_cpu_s"] - serving_cpu_s - r["wrk_cpu_s"]) / max(r["wall_s"], 1e-9)


def lua(users_file: Path, path: str, method: str, token: str | None) -> str:
    auth = f', ["Authorization"] = "Bearer {token}"' if token else ""
    return LUA % {"users": users_file, "path": path, "method": method, "auth": auth}


def histogram(bases: list[str], headers: dict) -> dict[float, float]:
    """``hm_mixer_request_seconds`` cumulative bucket counts by upper bound (s), summed over the
    mixers at ``bases`` (one mixer sums its workers itself; replicas are summed here)."""
    out: dict[float, float] = {}
    for base in bases:
        text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
        for le, v in re.findall(r'^hm_mixer_request_seconds_bucket\{[^}]*le="([^"]+)"[^}]*\} ([0-9.e+]+)$', text, re.M):
            out[float(le)] = out.get(float(le), 0.0) + float(v)
    return out


def quantile_from_buckets(before: dict, after: dict, q: float) -> float:
    """The ``q`` quantile (ms) of the requests observed between two scrapes, linear in a bucket
    (Prometheus' histogram_quantile); NaN without observations."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return float("nan")
    rank, prev_b, prev_c = q * total, 0.0, 0.0
    for b, c in zip(bounds, counts):
        if c >= rank:
            if b == float("inf"):
                return prev_b * 1000
            return (prev_b + (b - prev_b) * (rank - prev_c) / max(c - prev_c, 1e-12)) * 1000
        prev_b, prev_c = b, c
    return float("nan")


def worker_memory_mb(pids: list[int]) -> list[float]:
    """RSS (MB) of the mixer processes that serve: for each pid, its worker processes (the
    supervisor's children), or the process itself when it has none (a one-worker replica)."""
    out = []
    for pid in pids:
        proc = psutil.Process(pid)
        mine = []
        for p in proc.children():
            try:  # uvicorn's workers are multiprocessing spawns; its resource tracker is a child too
                if "resource_tracker" not in " ".join(p.cmdline()):
                    mine.append(p.memory_info().rss / 2**20)
            except psutil.Error:  # a worker that just died
                pass
        out += mine or [proc.memory_info().rss / 2**20]
    return out


def server_cpu_s(pids: list[int], redis_pid: int | None) -> float:
    """CPU seconds (user + system) used so far by the serving processes (each pid's whole tree: a
    mixer's supervisor and workers, the replicas, HAProxy) and Redis: the serving side's cost,
    without the load generator's. A process that died meanwhile takes its seconds with it (the
    level's figure is then low)."""
    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [root, *root.children(recursive=True)]
        except psutil.Error:  # a killed replica
            pass
    if redis_pid is not None:
        procs.append(psutil.Process(redis_pid))
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


@dataclass
class Served:
    """What the bench drives: where requests go and which processes serve them.

    Attributes:
        label: one line for the header.
        base: the URL requests go to (the mixer, or the front door).
        metrics_bases: mixer URLs whose ``/metrics`` histograms are summed (one per replica).
        mixer_pids: the mixer processes (supervisor or replica), for memory.
        cpu_pids: the processes whose CPU is the serving side's (mixers, plus HAProxy).
        warm_connections: connections of the warm-up (two per worker process).
        stop: stops everything the bench started for it.
        door: the ``MixerFrontDoor`` in front-door mode (the kill phase needs it), else None.
    """

    label: str
    base: str
    metrics_bases: list[str]
    mixer_pids: list[int]
    cpu_pids: list[int]
    warm_connections: int
    stop: object
    door: object = None


def start_served(state: StateDir, redis_url: str, args) -> Served:
    """The mixer of ``--workers`` processes, or (``--front-door haproxy``) ``--replicas`` replicas
    behind HAProxy, started from the state folder.

    Raises:
        core.services.ServiceError: a process did not start (its log's end in the message).
    """
    config = Path(args.config) if args.config else None
    if args.front_door == "haproxy":
        from mixer.config import load_config
        from mixer.front_door import MixerFrontDoor

        door = MixerFrontDoor(state, replicas=args.replicas, name="bench-load", config=config,
                              redis_url=redis_url).start()
        cfg = load_config(config)
        maxconn = cfg.front_door.maxconn(cfg.overload.max_in_flight, cfg.overload.max_concurrent)
        pids = [s.pid for s in door.servers]
        return Served(label=f"front door: HAProxy, {args.replicas} replicas of 1 worker, maxconn {maxconn} per "
                            f"replica (mixer bound {cfg.overload.max_in_flight}), queue <= {cfg.front_door.max_queue} "
                            f"for <= {cfg.front_door.queue_timeout_ms} ms",
                      base=door.url, metrics_bases=[s.url for s in door.servers], mixer_pids=pids,
                      cpu_pids=[*pids, door.haproxy.pid], warm_connections=2 * args.replicas, stop=door.stop,
                      door=door)
    from mixer.api import default_workers

    workers = args.workers or default_workers()
    mixer, base = start_mixer(state, redis_url, name="bench-load-mixer", workers=workers, config=config)
    return Served(label=f"mixer: {workers} worker(s) behind one port (the kernel balances)", base=base,
                  metrics_bases=[base], mixer_pids=[mixer.pid], cpu_pids=[mixer.pid], warm_connections=2 * workers,
                  stop=mixer.stop)


def haproxy_counters(door) -> dict[str, float]:
    """The front door's counters from HAProxy's exporter: retries (both tiers), redispatches, the
    5xx answers callers got, the replicas' backend queue and requests in flight."""
    text = httpx.get(door.metrics_url, timeout=5).text
    out = {}
    for key, pattern in (("retries", r'^haproxy_backend_retry_warnings_total\{proxy="mixers"\} (\S+)$'),
                         ("tier_retries", r'^haproxy_backend_retry_warnings_total\{proxy="retry"\} (\S+)$'),
                         ("redispatches", r'^haproxy_backend_redispatch_warnings_total\{proxy="mixers"\} (\S+)$'),
                         ("5xx", r'^haproxy_frontend_http_responses_total\{proxy="mixer",code="5xx"\} (\S+)$'),
                         ("max_queue", r'^haproxy_backend_max_queue\{proxy="mixers"\} (\S+)$'),
                         ("queue", r'^haproxy_backend_current_queue\{proxy="mixers"\} (\S+)$'),
                         ("in_flight", r'^haproxy_backend_current_sessions\{proxy="mixers"\} (\S+)$')):
        m = re.search(pattern, text, re.M)
        out[key] = float(m.group(1)) if m else float("nan")
    return out


def histogram_mean_ms(counts_by_ms: dict[str, int]) -> float:
    """Mean (ms) of a ``{"<ms>": count}`` histogram of 1 ms buckets (bucket middle); NaN if empty."""
    n = sum(counts_by_ms.values())
    return sum((int(k) + 0.5) * c for k, c in counts_by_ms.items()) / n if n else float("nan")


def clear_served(client: redis.Redis, users: list[int]) -> None:
    """Delete the served-posts records (``online_layout.served_posts``) of the bench's users: each
    level starts from the same state. Left alone, every page a user is served within
    ``served.ttl_seconds`` (1 h) joins the previously-served filter, so later levels and later runs
    rank fewer candidates and look faster (measured: 25-33 ms of CPU per answer from cleared records,
    13-18 ms after a dozen runs)."""
    for i in range(0, len(users), 500):
        client.delete(*(keys.served_posts(u) for u in users[i:i + 500]))


def kill_phase(served: Served, script: Path, connections: int, duration_s: int, redis_pid: int | None) -> dict:
    """Open-loop traffic through the front door; replica 1 SIGKILLed a third of the way in.

    Returns the wrk result plus ``killed_at_s`` (into the run), ``down_after_s`` (kill to HAProxy
    marking the replica DOWN; None if it did not within 10 s), ``failed`` (non-2xx + socket errors +
    timeouts the clients saw) and HAProxy's counter deltas (``retries``, ``redispatches``, ``5xx``).
    """
    door = served.door
    # requests the previous level left queued time out (503) after its wrk stopped: let them
    # drain first, or they would count here
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = haproxy_counters(door)
        if now["queue"] == 0 and now["in_flight"] == 0:
            break
        time.sleep(0.2)
    before = haproxy_counters(door)
    marks: dict[str, float | None] = {}
    started = time.monotonic()

    def kill() -> None:
        victim = door.kill_replica(0)
        marks["killed_at_s"] = time.monotonic() - started
        deadline = time.monotonic() + 10
        marks["down_after_s"] = None
        while time.monotonic() < deadline:
            if any(s["name"] == victim.name and s["status"].startswith("DOWN") for s in door.haproxy.servers()):
                marks["down_after_s"] = time.monotonic() - started - marks["killed_at_s"]
                break
            time.sleep(0.05)

    timer = threading.Timer(max(3.0, duration_s / 3), kill)
    cpu0 = server_cpu_s(served.cpu_pids, redis_pid)
    timer.start()
    r = run_wrk(served.base, script, connections, duration_s, threads=connections)
    timer.join()
    r["others"] = others_cores(r, server_cpu_s(served.cpu_pids, redis_pid) - cpu0)  # the killed replica's CPU is lost
    after = haproxy_counters(door)
    r.update(marks, failed=r["non2xx"] + r["socket_errors"] + r["timeouts"],
             **{k: after[k] - before[k] for k in ("retries", "tier_retries", "redispatches", "5xx")})
    return r


def print_targets(closed: dict[int, dict], opened: dict[float, dict], killed: dict | None) -> None:
    """The targets of issue 21 (a front door on 2 cores, load generator included) against this run."""
    rows = []

    def row(target: str, measured: str, ok: bool) -> None:
        rows.append(f"  {'MET ' if ok else 'MISS'} {target:<72} {measured}")

    if 1 in closed:
        r = closed[1]
        row("one client: p99 <= 50 ms", f"p99 {r['p99_us'] / 1e3:.1f} ms", r["p99_us"] / 1e3 <= 50)
    if 40 in opened:
        r = opened[40]
        row("open loop, Poisson 40/s: p99 <= 100 ms, zero errors",
            f"p99 {r['p99']:.0f} ms, {r['errors']} errors of {r['sent']}", r["p99"] <= 100 and r["errors"] == 0)
    if 8 in closed:
        r = closed[8]
        share = r["refused"] / max(r["requests"], 1)
        row("8 closed-loop connections: >= 55 answers/s, < 1 % 503, p99 <= 200 ms",
            f"{r['ok_rps']:.1f} answers/s, {share:.2%} 503, p99 {r['p99_us'] / 1e3:.0f} ms",
            r["ok_rps"] >= 55 and share < 0.01 and r["p99_us"] / 1e3 <= 200)
    if killed is not None:
        row(f"a replica SIGKILLed under {killed['rate']:.0f}/s: zero failed requests",
            f"{killed['failed']} failed of {killed['sent']}", killed["failed"] == 0)
    if rows:
        print("\ntargets (issue 21, 2 cores shared with the load generator):")
        print("\n".join(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None)
    ap.add_argument("--workers", type=int, default=None, help="mixer worker processes (default: one per core)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    ap.add_argument("--config", default=None, help="mixer YAML merged over the embedded one")
    ap.add_argument("--users", type=int, default=2000, help="distinct real users to cycle through")
    ap.add_argument("--warmup", type=int, default=10,
                    help="seconds of traffic on 2 connections per worker before measuring (0: none)")
    ap.add_argument("--rate", type=float, nargs="*", default=[],
                    help="open-loop levels too: offered requests/s (e.g. 20 40 80; 2x load = twice the sustained rate)")
    ap.add_argument("--open-connections", type=int, default=64,
                    help="connections of an open-loop level (enough that none waits on its last answer)")
    ap.add_argument("--front-door", choices=("none", "haproxy"), default="none",
                    help="haproxy: --replicas one-worker mixers behind HAProxy (mixer.front_door) instead of one "
                         "mixer of --workers processes")
    ap.add_argument("--replicas", type=int, default=None, help="front door: mixer replicas (default: one per core)")
    ap.add_argument("--kill-rate", type=float, default=20.0,
                    help="front door: open-loop requests/s of the last phase, where replica 1 is SIGKILLed (0: skip)")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make setup` (scripts/setup.sh installs Debian's wrk)")
    from mixer.api import default_workers
    from mixer.auth import client_token

    if args.front_door == "haproxy":
        if args.workers:
            ap.error("--workers is the kernel-balanced mixer's; with --front-door haproxy give --replicas")
        args.replicas = args.replicas or default_workers()
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()
    srv = RedisServer.running(state)
    started = None
    if srv is None:
        srv = started = RedisServer(state).start()
    served = None
    closed: dict[int, dict] = {}
    opened: dict[float, dict] = {}
    killed = None
    try:
        served = start_served(state, srv.url, args)
        base = served.base
        token = client_token(state)
        headers = {"Authorization": f"Bearer {token}"}
        users = load_training_set(state)["user_id"].drop_duplicates().sample(
            n=args.users, random_state=11).astype(int).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            users_file = Path(tmp) / "users.txt"
            users_file.write_text("\n".join(map(str, users)) + "\n")
            timeline = Path(tmp) / "timeline.lua"
            timeline.write_text(lua(users_file, "/v1/home-timeline", "POST", token))
            health = Path(tmp) / "healthz.lua"
            health.write_text(lua(users_file, "/healthz", "GET", None))
            client = redis.Redis.from_url(srv.url)
            if args.warmup > 0:  # steady state: every worker's models and shared caches warm
                run_wrk(base, timeline, served.warm_connections, args.warmup)
            print(f"{served.label}; {len(users)} real users, {args.warmup} s warm-up, "
                  f"{args.duration} s per level, wrk 1 thread on the same machine")
            print("Little's law: L = X x W, requests in the system = answers/s x mean latency (s); "
                  "a closed loop holds L at its connection count")
            print(f"{'conc':>4} {'rps':>6} {'2xx/s':>6} {'p50':>6} {'p95':>6} {'p99':>6} {'mean':>6} {'X*W':>5} "
                  f"{'non2xx':>6} {'503':>6} {'pipeline p99':>12} {'qf':>4} {'cpu ms':>6} {'others':>6} | "
                  f"{'floor rps':>9} {'p50':>5} {'p99':>5} | mixer RSS MB")
            print("(others: cores the machine's other processes used meanwhile, neither the serving side nor wrk)")
            for c in args.concurrency:
                clear_served(client, users)
                h0, cpu0 = histogram(served.metrics_bases, headers), server_cpu_s(served.cpu_pids, srv.pid)
                r = run_wrk(base, timeline, c, args.duration)
                ok = r["requests"] - r["non2xx"]
                serving = server_cpu_s(served.cpu_pids, srv.pid) - cpu0
                cpu = serving * 1000 / max(ok, 1)
                h1 = histogram(served.metrics_bases, headers)
                f = run_wrk(base, health, c, max(3, args.duration // 3))
                mem = worker_memory_mb(served.mixer_pids)
                qf = f"{r['qf']:.1f}" if r["qf"] >= 0 else "-"
                r["ok_rps"] = ok / (r["duration_us"] / 1e6)
                closed[c] = r
                print(f"{c:>4} {r['rps']:6.1f} {r['ok_rps']:6.1f} {r['p50_us'] / 1e3:6.1f} {r['p95_us'] / 1e3:6.1f} "
                      f"{r['p99_us'] / 1e3:6.1f} {r['mean_us'] / 1e3:6.1f} {r['rps'] * r['mean_us'] / 1e6:5.2f} "
                      f"{r['non2xx'] + r['socket_errors']:>6} {r['refused']:>6} "
                      f"{quantile_from_buckets(h0, h1, 0.99):12.1f} {qf:>4} {cpu:6.1f} {others_cores(r, serving):6.2f} | "
                      f"{f['rps']:9.0f} "
                      f"{f['p50_us'] / 1e3:5.1f} {f['p99_us'] / 1e3:5.1f} | "
                      f"{' '.join(f'{m:.0f}' for m in mem)} (sum {np.sum(mem):.0f})")
            if args.rate:
                print(f"\nopen loop: Poisson arrivals over {args.open_connections} connections, refusals not retried; "
                      f"latency of admitted (2xx) answers, client side, ms; X*W = mean admitted requests in flight")
                print(f"{'offered':>7} {'sent/s':>7} {'2xx/s':>6} {'503/s':>6} {'errors':>6} {'p50':>6} {'p95':>6} "
                      f"{'p99':>6} {'max':>6} {'mean':>6} {'X*W':>5} {'qf':>4} {'late':>5} {'cpu ms':>6} {'others':>6} "
                      "| mixer RSS MB")
            for rate in args.rate:
                clear_served(client, users)
                script = Path(tmp) / f"open_{rate:g}.lua"
                script.write_text(open_lua(users_file, "/v1/home-timeline", token, rate, args.open_connections))
                cpu0 = server_cpu_s(served.cpu_pids, srv.pid)
                r = run_wrk(base, script, args.open_connections, args.duration, threads=args.open_connections)
                secs = r["duration_us"] / 1e6
                ok = sum(r["admitted_ms"].values())
                serving = server_cpu_s(served.cpu_pids, srv.pid) - cpu0
                cpu = serving * 1000 / max(ok, 1)
                p50, p95, p99, pmax = histogram_quantiles(r["admitted_ms"], (0.5, 0.95, 0.99, 1.0))
                mean = histogram_mean_ms(r["admitted_ms"])
                errors = r["non2xx"] + r["socket_errors"] + r["timeouts"]
                opened[rate] = {"p99": p99, "errors": errors, "sent": r["sent"]}
                mem = worker_memory_mb(served.mixer_pids)
                qf = f"{r['qf']:.1f}" if r["qf"] >= 0 else "-"
                print(f"{rate:7.0f} {r['sent'] / secs:7.1f} {ok / secs:6.1f} {r['refused'] / secs:6.1f} {errors:>6} "
                      f"{p50:6.0f} {p95:6.0f} {p99:6.0f} {pmax:6.0f} {mean:6.1f} {ok / secs * mean / 1000:5.2f} "
                      f"{qf:>4} {r['late']:>5} {cpu:6.1f} {others_cores(r, serving):6.2f} | "
                      f"{' '.join(f'{m:.0f}' for m in mem)} (sum {np.sum(mem):.0f})")
            if served.door is not None and args.kill_rate > 0:
                clear_served(client, users)
                script = Path(tmp) / "kill.lua"
                script.write_text(open_lua(users_file, "/v1/home-timeline", token, args.kill_rate,
                                           args.open_connections))
                k = kill_phase(served, script, args.open_connections, max(args.duration, 10), srv.pid)
                p50, p99, pmax = histogram_quantiles(k["admitted_ms"], (0.5, 0.99, 1.0))
                secs = k["duration_us"] / 1e6
                down = "not within 10 s" if k["down_after_s"] is None else f"{k['down_after_s'] * 1000:.0f} ms later"
                print(f"\nkill: open loop {args.kill_rate:g}/s for {secs:.0f} s, replica 1 SIGKILLed at "
                      f"{k['killed_at_s']:.1f} s, marked DOWN {down}; {k['sent']} sent, "
                      f"{sum(k['admitted_ms'].values())} answered 2xx, failed {k['failed']} (non-2xx {k['non2xx']}, "
                      f"socket errors {k['socket_errors']}, timeouts {k['timeouts']}); HAProxy retried "
                      f"{k['retries']:.0f} (retry tier {k['tier_retries']:.0f}), redispatched {k['redispatches']:.0f}, 5xx to "
                      f"callers {k['5xx']:.0f}; admitted "
                      f"p50 / p99 / max {p50:.0f} / {p99:.0f} / {pmax:.0f} ms; others used {k['others']:.2f} cores")
                killed = {"rate": args.kill_rate, "failed": k["failed"], "sent": k["sent"]}
        print_targets(closed, opened, killed)
    finally:
        if served is not None:
            served.stop()
        if started:
            started.stop()


if __name__ == "__main__":
    main()
