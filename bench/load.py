"""The mixer under load: throughput and latency at rising concurrency, driven by Debian's ``wrk``.

Needs a state folder the demo filled (``make demo``). Starts Redis (if not running) and a mixer with
``--workers`` processes from that state, then for each concurrency (1, 2, 4, 8, 16 connections by
default) runs ``wrk`` for ``--duration`` seconds with a Lua script that posts home-timeline requests
for real user ids of the log (round robin from a random start per connection), and the same
concurrency against ``GET /healthz`` (the floor: HTTP and the server loop, no ranking). Prints per
concurrency: requests/s, p50/p95/p99 (ms, every answer), non-2xx answers (503 = refused at the
in-flight bound), the admitted requests' p99 from the mixer's own ``hm_mixer_request_seconds``
histogram (server side, interpolated), the quality factor the responses reported last, and the
mixer's memory per worker (RSS, MB). The load generator runs on the same machine, as the target
says ("on 2 cores, load generator included").

    .venv/bin/python bench/load.py [--state .state] [--workers 2] [--duration 15] [--concurrency 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import numpy as np
import psutil

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
    '"p99_us": %%d, "non2xx": %%d, "refused": %%d, "socket_errors": %%d, "timeouts": %%d, "qf": %%f}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    n, r, e.connect + e.read + e.write, e.timeout, q))
end
"""


def run_wrk(url: str, script: Path, connections: int, duration_s: int) -> dict:
    """One wrk run (1 thread: the generator must leave the cores to the mixer); its RESULT line.

    Raises:
        RuntimeError: wrk printed no result (its output is in the message).
    """
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "5s",
                          "-s", str(script), url], capture_output=True, text=True, check=False)
    m = re.search(r"^RESULT (\{.*\})$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    return r


def lua(users_file: Path, path: str, method: str, token: str | None) -> str:
    auth = f', ["Authorization"] = "Bearer {token}"' if token else ""
    return LUA % {"users": users_file, "path": path, "method": method, "auth": auth}


def histogram(base: str, headers: dict) -> dict[float, float]:
    """``hm_mixer_request_seconds`` cumulative bucket counts by upper bound (s), summed over workers."""
    text = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
    out: dict[float, float] = {}
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


def worker_memory_mb(pid: int) -> list[float]:
    """RSS (MB) of the mixer's worker processes (the supervisor's children; the process itself
    when it has none)."""
    proc = psutil.Process(pid)
    out = []
    for p in proc.children():
        try:  # uvicorn's workers are multiprocessing spawns; its resource tracker is a child too
            if "resource_tracker" not in " ".join(p.cmdline()):
                out.append(p.memory_info().rss / 2**20)
        except psutil.Error:  # a worker that just died
            pass
    return out or [proc.memory_info().rss / 2**20]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None)
    ap.add_argument("--workers", type=int, default=None, help="mixer worker processes (default: one per core)")
    ap.add_argument("--duration", type=int, default=15, help="seconds per concurrency level")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--config", default=None, help="mixer YAML merged over the embedded one")
    ap.add_argument("--users", type=int, default=2000, help="distinct real users to cycle through")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make setup` (scripts/setup.sh installs Debian's wrk)")
    from mixer.api import default_workers

    workers = args.workers or default_workers()
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()
    srv = RedisServer.running(state)
    started = None
    if srv is None:
        srv = started = RedisServer(state).start()
    mixer = None
    try:
        mixer, base = start_mixer(state, srv.url, name="bench-load-mixer", workers=workers,
                                  config=Path(args.config) if args.config else None)
        token = mixer.token
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
            with httpx.Client(timeout=30, headers=headers) as client:  # warm every worker
                for uid in users[:10 * workers]:
                    client.post(f"{base}/v1/home-timeline", json={"user_id": uid, "limit": 20})
            print(f"mixer: {workers} worker(s), {len(users)} real users, {args.duration} s per level, "
                  f"wrk 1 thread on the same machine")
            print(f"{'conc':>4} {'rps':>7} {'p50':>6} {'p95':>6} {'p99':>6} {'non2xx':>7} {'503':>6} "
                  f"{'admitted p99':>12} {'qf':>5} | {'floor rps':>9} {'p50':>5} {'p99':>5} | worker RSS MB")
            for c in args.concurrency:
                h0 = histogram(base, headers)
                r = run_wrk(base, timeline, c, args.duration)
                h1 = histogram(base, headers)
                f = run_wrk(base, health, c, max(3, args.duration // 3))
                mem = worker_memory_mb(mixer.pid)
                qf = f"{r['qf']:.2f}" if r["qf"] >= 0 else "-"
                print(f"{c:>4} {r['rps']:7.1f} {r['p50_us'] / 1e3:6.1f} {r['p95_us'] / 1e3:6.1f} "
                      f"{r['p99_us'] / 1e3:6.1f} {r['non2xx'] + r['socket_errors']:>7} {r['refused']:>6} "
                      f"{quantile_from_buckets(h0, h1, 0.99):12.1f} {qf:>5} | {f['rps']:9.0f} "
                      f"{f['p50_us'] / 1e3:5.1f} {f['p99_us'] / 1e3:5.1f} | "
                      f"{' '.join(f'{m:.0f}' for m in mem)} (sum {np.sum(mem):.0f})")
    finally:
        if mixer is not None:
            mixer.stop()
        if started:
            started.stop()


if __name__ == "__main__":
    main()
