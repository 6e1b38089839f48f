"""The HA online store's failover under load, on a full state folder (issue 21's measurement, repeated).

Issue 21 measured the single Redis SIGKILLed under a 2-connection closed loop over random real
users, then restarted: 677 answers 200 (198 degraded), 5,124 answers 503. This runs the same load
against the HA store (``home-mixer services start --ha``: primary + replica + 3 Sentinels) and
SIGKILLs the primary instead:

- a temporary state folder gets a copy of ``--state``'s tables, MLflow and compiled models, and the
  primary's data folder a copy of its Redis AOF (``--state`` is only read); the HA set starts on it
  (the replica full-syncs the whole online store) and a mixer with ``--workers`` processes on the
  Sentinel address;
- Debian's ``wrk`` runs a closed loop of ``--connections`` (2) connections for ``--duration`` s
  over ``--users`` random real users (as ``bench/load.py``); after ``--kill-after`` s the primary
  gets SIGKILL;
- prints the answers by status (200 / 200 degraded / 503 / other, socket errors), when Sentinel
  promoted the replica and when the mixer's writes reached it (an impression served after the
  kill on the new primary), and the mixer's side-effect write counters (flushed, dropped, not
  confirmed by a replica).

    .venv/bin/python bench/ha_failover.py --state /tmp/hmstate [--duration 20] [--kill-after 5]
                                          [--workers 2] [--connections 2] [--users 2000] [--keep]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import redis

from core import online_layout as keys
from core.services import RedisHA, pid_alive
from core.state import StateDir
from home_mixer.demo import start_mixer
from pipelines.training_set import load_training_set

LUA = r"""
local users = {}
for line in io.lines("%(users)s") do users[#users + 1] = line end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) idx = math.random(#users); ok = 0; degraded = 0; s503 = 0; other = 0 end
function request()
  idx = idx %% #users + 1
  return wrk.format("POST", "/v1/home-timeline", {["Content-Type"] = "application/json"%(auth)s},
                    '{"user_id": ' .. users[idx] .. ', "limit": 20}')
end
function response(status, headers, body)
  if status == 200 then
    ok = ok + 1
    if not string.find(body, '"degraded":[]', 1, true) then degraded = degraded + 1 end
  elseif status == 503 then s503 = s503 + 1
  else other = other + 1 end
end
function done(summary, latency, requests)
  local o, d, u, x = 0, 0, 0, 0
  for _, t in ipairs(threads) do o = o + t:get("ok"); d = d + t:get("degraded"); u = u + t:get("s503"); x = x + t:get("other") end
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "ok": %%d, "degraded": %%d, "s503": %%d, "other": %%d, ' ..
    '"socket_errors": %%d, "timeouts": %%d, "p99_us": %%d}\n', summary.requests, o, d, u, x,
    e.connect + e.read + e.write, e.timeout, latency:percentile(99)))
end
"""


def copy_state(src: StateDir, work: StateDir) -> None:
    """The tables, MLflow (registry + artifacts), Feast registry and compiled models of ``src`` into
    ``work``, and ``src``'s Redis AOF into the HA primary's data folder (node 1)."""
    for name in ("tables", "mlflow", "feast", "compiled"):
        if (src.root / name).exists():
            shutil.copytree(src.root / name, work.root / name, dirs_exist_ok=True)
    aof = src.redis / "appendonlydir"
    if not aof.exists():
        raise SystemExit(f"{aof} not found: --state needs a filled online store (make demo)")
    shutil.copytree(aof, work.redis / "ha" / "node-1" / "appendonlydir")


def counters(text: str, name: str) -> dict[str, float]:
    """``{side_effect: value}`` of one counter of the mixer's /metrics (summed over its workers)."""
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}\{{side_effect="(\w+)"\}} ([\d.e+]+)$', text, re.M)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True, help="a filled state folder (read only)")
    ap.add_argument("--duration", type=int, default=20, help="seconds of load")
    ap.add_argument("--kill-after", type=float, default=5.0, help="seconds of load before the primary's SIGKILL")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--connections", type=int, default=2)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary state folder")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `make setup` (scripts/setup.sh installs Debian's wrk)")
    src = StateDir(Path(args.state).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="hm-ha-bench-"))
    work = StateDir(tmp / "state").ensure()
    ha = mixer = None
    try:
        t = time.monotonic()
        copy_state(src, work)
        ha = RedisHA(work).start(timeout_s=900)
        print(f"HA store on a copy of {src.root}: ready in {time.monotonic() - t:.0f} s ({ha.address})", flush=True)
        mixer, base = start_mixer(work, ha.address, name="bench-ha-mixer", workers=args.workers, timeout_s=300)
        users = load_training_set(work)["user_id"].drop_duplicates().sample(n=args.users, random_state=11)
        users_file = tmp / "users.txt"
        users_file.write_text("\n".join(map(str, users.astype(int).tolist())) + "\n")
        script = tmp / "failover.lua"
        script.write_text(LUA % {"users": users_file, "auth": f', ["Authorization"] = "Bearer {mixer.token}"'})
        for _ in range(2 * args.workers):  # each worker past its first request
            httpx.post(f"{base}/v1/home-timeline", json={"user_id": int(users.iloc[0]), "limit": 20},
                       headers={"Authorization": f"Bearer {mixer.token}"}, timeout=60)
        headers = {"Authorization": f"Bearer {mixer.token}"}
        before = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
        primary = ha.primary_node()
        sentinel = ha.sentinels()[0]
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration}s", "--timeout", "10s",
                                "-s", str(script), base], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.kill_after)
        unconfirmed_before = counters(httpx.get(f"{base}/metrics", headers=headers, timeout=10).text,
                                      "hm_mixer_side_effect_unreplicated_total")
        t_kill, pid = time.time(), primary.pid
        primary.kill()
        while pid_alive(pid):
            time.sleep(0.01)
        t_promoted = t_resumed = None
        while t_resumed is None and time.time() - t_kill < 30:
            port = sentinel.primary()
            if port is not None and port != primary.port:
                t_promoted = t_promoted or time.time()
                client = redis.Redis(port=port, socket_timeout=1)
                try:
                    newest = client.xrevrange(keys.SERVED_IMPRESSIONS, count=200)
                    if any(float(f[b"served_at"]) >= t_kill for _, f in newest):
                        t_resumed = time.time()
                except redis.RedisError:
                    pass
                finally:
                    client.close()
            time.sleep(0.02)
        out, _ = wrk.communicate(timeout=args.duration + 60)
        m = re.search(r"^RESULT (\{.*\})$", out, re.M)
        if not m:
            raise SystemExit(f"wrk gave no result:\n{out}")
        r = json.loads(m.group(1))
        time.sleep(1.0)  # the store watcher flushes every 0.25 s
        after = httpx.get(f"{base}/metrics", headers=headers, timeout=10).text
        print(f"load: wrk closed loop, {args.connections} connections, {args.duration} s, {args.users} random real "
              f"users, mixer {args.workers} workers; primary SIGKILLed at +{args.kill_after:.0f} s")
        print(f"answers: {r['requests']} ({r['ok']} x 200 of which {r['degraded']} degraded, {r['s503']} x 503, "
              f"{r['other']} other, {r['socket_errors']} socket errors, {r['timeouts']} timeouts); "
              f"p99 {r['p99_us'] / 1e3:.0f} ms")
        print(f"Sentinel promoted the replica +{(t_promoted or float('nan')) - t_kill:.2f} s after the kill; the "
              f"mixer's writes reached it +{(t_resumed or float('nan')) - t_kill:.2f} s after")
        flushed = {k: v - counters(before, "hm_mixer_side_effect_buffer_flushed_total").get(k, 0)
                   for k, v in counters(after, "hm_mixer_side_effect_buffer_flushed_total").items()}
        print(f"side-effect writes: buffered and flushed {flushed}, dropped "
              f"{counters(after, 'hm_mixer_side_effect_buffer_dropped_total')}, not confirmed by a replica before "
              f"the kill {unconfirmed_before or 0}")
    finally:
        if mixer is not None:
            mixer.stop()
        if ha is not None:
            RedisHA(work).stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
