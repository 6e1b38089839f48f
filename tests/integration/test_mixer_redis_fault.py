"""Redis SIGKILLed under load, then restarted by the project's own start path: the mixer process
(``MixerServer``, real uvicorn) keeps answering known users with 200 and ``degraded`` from its
last-known-good caches, buffers the served-posts / impression writes, and answers normally within
2 s of Redis answering again, with the buffered impressions written after recovery.

Everything is real: a redis-server of its own (``core.services.RedisServer`` in a temporary state
folder, killed with SIGKILL), the candidate index and online features built from KuaiRand, tiny
rankers in the state's MLflow. The timeline is printed for the report (``-s`` shows it).
"""

from __future__ import annotations

import io
import re
import time
from collections import Counter
from contextlib import redirect_stdout

import httpx
import pandas as pd
import pytest
import redis
import yaml

from core import online_layout as keys
from core.services import RedisServer, pid_alive
from core.state import StateDir
from mixer.server import MixerServer
from tests.integration._traffic import PacedLoad
from tests.integration.test_mixer_api import AS_OF, COLD_USER, prepare_served_state

pytestmark = pytest.mark.integration

RATE_HZ = 40  # requests per second of the load (the throughput target of the mixer)
OUTAGE_S = 3.0  # seconds Redis stays down
RECOVERY_LIMIT_S = 2.0
HEALTH_SAMPLES = 6  # /healthz calls during the outage


def _known_users(data_dir) -> list[int]:
    log = pd.read_csv(data_dir / "log_standard_20220425_20220504.csv", usecols=["user_id"])
    counts = log.user_id.value_counts()
    return [int(u) for u in counts.index[:4]] + [int(counts.index[len(counts) // 2])]


def _by_side_effect(metrics_text: str, name: str) -> dict[str, float]:
    """``{side_effect: value}`` of one counter, summed over the workers by the mixer's registry."""
    return {m[1]: float(m[2]) for m in re.finditer(rf'^{name}\{{side_effect="(\w+)"\}} ([\d.e+]+)$',
                                                     metrics_text, re.M) if float(m[2]) > 0}


def _hit_rates(metrics_text: str) -> dict[str, str]:
    """``{cache: "hit rate (hits/misses/lkg)"}`` from ``hm_mixer_cache_requests_total`` lines."""
    counts: dict[str, dict[str, float]] = {}
    for m in re.finditer(r'^hm_mixer_cache_requests_total\{cache="(\w+)",result="(\w+)"\} ([\d.e+]+)$',
                         metrics_text, re.M):
        counts.setdefault(m[1], {})[m[2]] = float(m[3])
    return {c: f"{v.get('hit', 0) / max(1, v.get('hit', 0) + v.get('miss', 0)):.1%} "
               f"({v.get('hit', 0):.0f}/{v.get('miss', 0):.0f}/{v.get('lkg', 0):.0f})" for c, v in sorted(counts.items())}


def test_redis_killed_and_restarted_under_load(tmp_path, data_dir, monkeypatch):
    from home_mixer.cli import main as cli

    state = StateDir(tmp_path / "state").ensure()
    srv = RedisServer(state).start()
    mixer = None
    users = _known_users(data_dir)
    try:
        url, client = prepare_served_state(state, data_dir, srv, users)
        config = tmp_path / "mixer.yaml"
        config.write_text(yaml.safe_dump({
            "redis_url": url, "auth": {"enabled": False},
            "models": {"tracking_uri": state.mlflow_tracking_uri, "reload_interval_s": 0},
            "clock": {"now": AS_OF.isoformat().replace("+00:00", "Z")},
            "drift_sample": {"enabled": False},
            # the in-flight bound is tested elsewhere: here no request may be refused for load
            "overload": {"max_in_flight": 16},
        }))
        mixer = MixerServer(state, config=config, workers=2).start(timeout_s=240)
        with httpx.Client(base_url=mixer.url, timeout=30) as http:
            # each user served a few times, on fresh connections so the kernel spreads them over
            # both workers: they are "users served before", and each worker's caches are warm
            for i in range(4 * len(users)):
                r = httpx.post(f"{mixer.url}/v1/home-timeline", json={"user_id": users[i % len(users)], "limit": 10},
                               timeout=30)
                assert r.status_code == 200 and r.json()["degraded"] == [], r.text
            health = http.get("/healthz").json()
            assert health["status"] == "ok" and health["mode"] == "batch_only" and health["redis"]["up"]

            before = client.xlen(keys.SERVED_IMPRESSIONS)
            with PacedLoad(mixer.url, users, RATE_HZ) as load:
                time.sleep(2.0)
                port, crashed = srv.port, srv.pid
                t_kill = time.time()
                srv.kill()  # SIGKILL
                while pid_alive(crashed):
                    time.sleep(0.01)
                time.sleep(OUTAGE_S)
                # fresh connections, so the kernel may hand them to either worker: each speaks for itself
                during = [httpx.get(f"{mixer.url}/healthz", timeout=10) for _ in range(HEALTH_SAMPLES)]
                monkeypatch.setenv("HOME_MIXER_STATE", str(state.root))
                out = io.StringIO()
                t_restart = time.time()
                with redirect_stdout(out):  # `home-mixer services start`: the port comes from the record
                    assert cli(["--state", str(state.root), "services", "start"]) == 0, out.getvalue()
                t_up = time.time()
                srv = RedisServer.running(state)
                assert srv is not None and srv.port == port, out.getvalue()
                time.sleep(4.0)
            after = http.get("/healthz").json()
            metrics = http.get("/metrics").text

        records = load.records
        outage = [r for r in records if t_kill <= r[0] < t_up]
        # Sent after the kill and answered before the restart began: Redis was surely down for the
        # whole request. Requests straddling the kill or the restart may fairly be served either way.
        surely_down = [r for r in records if r[4] >= t_kill and r[0] < t_restart]
        errors = [r for r in records if r[2] != 200]
        degraded_answers = [r for r in surely_down if r[3]]
        recovered = next((r for r in records if r[0] >= t_up and r[2] == 200 and not r[3]), None)
        recovery_s = None if recovered is None else recovered[0] - t_up
        # impressions served while Redis was down reached the stream after it came back
        client = redis.Redis.from_url(url)
        entries = client.xrange(keys.SERVED_IMPRESSIONS, min="-", max="+")
        served_in_outage = sum(1 for _, f in entries if t_kill <= float(f[b"served_at"]) < t_restart)
        # /healthz speaks for the worker that answered it; the metrics sum every worker
        dropped = _by_side_effect(metrics, "hm_mixer_side_effect_buffer_dropped_total")
        flushed = _by_side_effect(metrics, "hm_mixer_side_effect_buffer_flushed_total")
        health_seen = dict(Counter(f"{h.status_code} {h.json().get('status')}" for h in during))
        print(f"\nRedis fault timeline: {len(records)} requests at {load.achieved_hz:.1f}/s (2 workers); "
              f"Redis SIGKILLed at +0.00 s, restarted (services start, same port {port}) at "
              f"+{t_restart - t_kill:.2f} s, answering at +{t_up - t_kill:.2f} s")
        print(f"  during the outage: {len(outage)} answers, {len(surely_down)} wholly inside it, "
              f"{len(degraded_answers)} of those degraded, "
              f"stages {sorted({s for r in outage for s in (r[3] or [])})}; /healthz {health_seen}")
        print(f"  errors (non-200) overall: {len(errors)} {[(r[2], r[5][:160]) for r in errors][:10]}")
        print(f"  first normal answer {recovery_s if recovery_s is None else round(recovery_s, 3)} s after Redis "
              f"answered (limit {RECOVERY_LIMIT_S} s)")
        print(f"  buffered writes: flushed {flushed}, dropped {dropped}; impressions in the stream {before} -> "
              f"{len(entries)}, {served_in_outage} stamped inside the outage")
        print(f"  cache hit rates (hit / (hit + miss), lkg = served because Redis failed): {_hit_rates(metrics)}")

        assert not errors, errors[:5]
        assert surely_down and len(degraded_answers) == len(surely_down)  # each says it is degraded
        # a worker with shared caches answers degraded (200); one that never served a page holds
        # nothing to answer from and says unavailable (503); none says ok while Redis is down
        for h in during:
            body = h.json()
            warm = body["caches"]["entries"]["popular"] + body["caches"]["entries"]["post_meta"] > 0
            assert not body["redis"]["up"], body
            assert (h.status_code, body["status"]) == ((200, "degraded") if warm else (503, "unavailable")), body
        assert recovery_s is not None and recovery_s <= RECOVERY_LIMIT_S
        assert after["status"] == "ok" and after["redis"]["up"] and after["redis"]["outages"] >= 1
        assert after["buffered_writes"]["pending"] == 0
        for name in ("impression_log", "served_posts", "feature_log"):  # every write of the outage kept or counted
            assert flushed.get(name, 0) + dropped.get(name, 0) >= len(surely_down), (name, flushed, dropped)
        if not dropped:  # every page served before the restart began is in the stream (10 items a page)
            assert served_in_outage >= 10 * (sum(1 for r in outage if r[0] < t_restart) - 2) > 0
        assert 'hm_mixer_cache_requests_total{cache="post_features",result="hit"}' in metrics
        client.close()
    finally:
        if mixer is not None:
            mixer.stop()
        found = RedisServer.running(state)
        if found is not None:
            found.stop()
        elif srv is not None:
            srv.stop()
