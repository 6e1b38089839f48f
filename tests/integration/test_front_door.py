"""The mixer's front door for real: Debian's HAProxy (``mixer.haproxy``) in front of two real mixer
replicas (``mixer.front_door.MixerFrontDoor``: uvicorn processes on their own loopback ports), on a
Redis of this module's own (it is stopped and restarted here), with the candidate index, tiny
rankers in MLflow and online features of ``test_mixer_api.prepare_served_state``.

- a replica with nothing to serve (Redis down and its caches cold: ``/healthz`` 503) leaves the
  pool, while a replica that served before keeps answering from its caches; it comes back when
  Redis does;
- a burst of twice the replicas' in-flight bound queues in HAProxy and is answered, where the same
  burst on one replica is partly refused (503);
- a replica SIGKILLed under 20 requests/s costs the clients nothing: HAProxy retries what it had
  sent the dead replica on the other one;
- ``home-mixer serve mixer status`` shows the front door from its records, ``stop`` stops it all.

The tests run in this order (each leaves both replicas up, but the last two).
"""

from __future__ import annotations

import io
import json
import re
import threading
import time
from contextlib import redirect_stdout

import httpx
import pytest
import yaml

from core.services import RedisServer, pid_alive
from core.state import StateDir
from tests.integration._traffic import PacedLoad
from tests.integration.test_mixer_api import AS_OF, known_users, prepare_served_state  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(__import__("shutil").which("haproxy") is None,
                       reason="haproxy not on PATH: install Debian's haproxy (scripts/setup.sh does it)"),
]

BOUND = 3  # the mixer's overload.max_in_flight (the embedded default)


@pytest.fixture(scope="module")
def door(tmp_path_factory, data_dir, known_users):  # noqa: F811
    """(front door with 2 replicas, the module's Redis server, its state folder)."""
    from mixer.front_door import MixerFrontDoor

    state = StateDir(tmp_path_factory.mktemp("front_door_state")).ensure()
    redis_srv = RedisServer(state).start()
    door = None
    try:
        url, client = prepare_served_state(state, data_dir, redis_srv, known_users)
        client.close()
        config = state.root / "mixer.yaml"
        config.write_text(yaml.safe_dump({
            "redis_url": url, "models": {"tracking_uri": state.mlflow_tracking_uri, "reload_interval_s": 0},
            "clock": {"now": AS_OF.isoformat().replace("+00:00", "Z")}, "drift_sample": {"enabled": False},
            "overload": {"max_in_flight": BOUND},
            # checks every 0.5 s (0.2 s while a replica changes state): the tests wait less
            "front_door": {"health": {"interval_ms": 500, "fast_interval_ms": 200, "down_interval_ms": 250}},
        }))
        door = MixerFrontDoor(state, replicas=2, config=config).start(timeout_s=240)  # records as the CLI's
        yield door, redis_srv, state
    finally:
        if door is not None:
            door.stop()
        redis_srv = RedisServer.find(state) or redis_srv
        redis_srv.stop()


def _servers(door) -> dict[str, str]:
    """``{replica: HAProxy status}``."""
    return {s["name"]: s["status"] for s in door.haproxy.servers()}


def _all_up(door) -> None:
    """Wait until HAProxy has every replica fully up (a check in flight shows "UP 1/2")."""
    _wait_for("every replica up", lambda: set(_servers(door).values()) == {"UP"}, 10)


def _wait_for(what: str, probe, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.1)


def _metric(door, name: str, **labels) -> float:
    """One sample of HAProxy's Prometheus exporter."""
    text = httpx.get(door.metrics_url, timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{name}\{{{re.escape(want)}\}} ([0-9.e+]+)$", text, re.M)
    assert m, f"{name}{{{want}}} not exported"
    return float(m.group(1))


def _queue_wait_s(door) -> float:
    """Seconds the replicas' admitted requests waited in all (``hm_mixer_queue_wait_seconds_sum``,
    summed over the replicas): the front door's queue counts, from its X-Request-Start stamp."""
    total = 0.0
    for srv in door.servers:
        text = httpx.get(f"{srv.url}/metrics", timeout=5).text
        total += float(re.search(r"^hm_mixer_queue_wait_seconds_sum ([0-9.e+]+)$", text, re.M).group(1))
    return total


def _burst(url: str, headers: dict, users: list[int], n: int) -> list[int]:
    """``n`` timeline requests sent at once (a barrier), each on its own connection; their statuses."""
    statuses: list[int] = [0] * n
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        with httpx.Client(timeout=30, headers=headers) as http:
            barrier.wait()
            statuses[i] = http.post(f"{url}/v1/home-timeline",
                                    json={"user_id": users[i % len(users)], "limit": 5}).status_code

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return statuses


def test_a_replica_with_nothing_to_serve_leaves_the_pool(door, known_users):  # noqa: F811
    """Redis goes down: replica 1, which served these users, answers from its caches (degraded,
    /healthz 200) and stays; replica 2, which never served (caches cold), has nothing to serve
    (/healthz 503), fails its checks and leaves; every request through the front door is answered.
    Redis back: replica 2 passes its checks and returns."""
    door, redis_srv, state = door
    first, second = door.servers
    _all_up(door)
    with httpx.Client(base_url=first.url, timeout=30, headers=door.auth_headers) as http:
        for user in known_users * 2:  # straight to replica 1: its caches hold these users' context
            assert http.post("/v1/home-timeline", json={"user_id": user, "limit": 5}).status_code == 200
    crashed = redis_srv.pid
    redis_srv.kill()
    _wait_for("Redis to die", lambda: not pid_alive(crashed))
    t_down = time.monotonic()
    _wait_for("replica 2 to leave the pool", lambda: _servers(door)[second.name] == "DOWN")
    left_s = time.monotonic() - t_down
    health = {s.name: httpx.get(f"{s.url}/healthz", timeout=10) for s in door.servers}
    assert health[second.name].status_code == 503 and health[second.name].json()["status"] == "unavailable"
    assert health[first.name].status_code == 200 and health[first.name].json()["status"] == "degraded"
    assert _servers(door)[first.name] == "UP"
    with httpx.Client(base_url=door.url, timeout=30, headers=door.auth_headers) as http:
        answers = [http.post("/v1/home-timeline", json={"user_id": u, "limit": 5}) for u in known_users * 4]
    assert [a.status_code for a in answers] == [200] * len(answers), [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["degraded"] for a in answers)  # served by replica 1, from its caches

    restarted = RedisServer(state).start()  # the recorded port: the replicas' address still holds
    assert restarted.port == redis_srv.port
    t_up = time.monotonic()
    _wait_for("replica 2 to rejoin", lambda: _servers(door) == {first.name: "UP", second.name: "UP"})
    print(f"\nnothing to serve: replica 2 out of the pool {left_s:.2f} s after Redis died "
          f"(fall 2 checks); {len(answers)} requests answered 200 by replica 1 meanwhile; back "
          f"{time.monotonic() - t_up:.2f} s after Redis restarted")


def test_a_burst_beyond_the_mixers_bound_queues_instead_of_refusing(door, known_users):  # noqa: F811
    """12 requests at once: one replica alone admits 3 and refuses the rest (503); through the
    front door, which sends each replica at most its maxconn, they all wait their turn and get 200."""
    door, _, _ = door
    first = door.servers[0]
    _all_up(door)
    n = 4 * BOUND  # twice what both replicas admit at once
    direct = _burst(first.url, door.auth_headers, known_users, n)
    assert direct.count(503) >= 1 and set(direct) <= {200, 503}, direct  # the mixer's own bound refuses
    errors_before = _metric(door, "haproxy_backend_http_responses_total", proxy="mixers", code="5xx")
    waited_before = _queue_wait_s(door)
    t0 = time.monotonic()
    fronted = _burst(door.url, door.auth_headers, known_users, n)
    took = time.monotonic() - t0
    assert fronted == [200] * n, fronted
    queued = _metric(door, "haproxy_backend_max_queue", proxy="mixers")
    assert queued >= 1  # HAProxy queued the excess rather than passing it on
    assert _metric(door, "haproxy_backend_http_responses_total", proxy="mixers", code="5xx") == errors_before
    # the replicas counted the wait in HAProxy's queue as their callers' (X-Request-Start)
    waited = _queue_wait_s(door) - waited_before
    assert waited >= 0.05, waited
    print(f"\nburst of {n}: one replica alone {direct.count(200)} x 200, {direct.count(503)} x 503; through the "
          f"front door {fronted.count(200)} x 200 in {took:.2f} s, at most {queued:.0f} queued in HAProxy, "
          f"{waited:.2f} s of queue wait seen by the replicas")


def test_a_replica_killed_under_load_costs_the_clients_nothing(door, known_users):  # noqa: F811
    """20 requests/s from 4 keep-alive clients through the front door; replica 1 is SIGKILLed
    mid-stream. Requests in flight on it or sent to it before it is marked down are retried on
    replica 2 (retry-on conn-failure empty-response, redispatch): no client sees an error."""
    door, _, _ = door
    victim, survivor = door.servers
    _all_up(door)
    retries_before = _metric(door, "haproxy_backend_retry_warnings_total", proxy="mixers")
    redispatches_before = _metric(door, "haproxy_backend_redispatch_warnings_total", proxy="mixers")
    with PacedLoad(door.url, known_users, rate_hz=20, threads=4, headers=door.auth_headers) as load:
        time.sleep(2.0)
        t_kill = time.time()
        door.kill_replica(0)
        _wait_for("the killed replica to leave the pool", lambda: _servers(door)[victim.name] == "DOWN", 10)
        time.sleep(3.0)
    records = load.records
    failed = [(round(r[4] - t_kill, 2), r[2]) for r in records if r[2] != 200]
    after = [r for r in records if r[4] >= t_kill]
    worst = max(r[0] - r[4] for r in records if abs(r[4] - t_kill) < 1.0)
    retried = _metric(door, "haproxy_backend_retry_warnings_total", proxy="mixers") - retries_before
    redispatched = _metric(door, "haproxy_backend_redispatch_warnings_total", proxy="mixers") - redispatches_before
    print(f"\nreplica SIGKILLed under load: {len(records)} requests at {load.achieved_hz:.1f}/s, {len(after)} sent "
          f"after the kill, {len(failed)} failed {failed[:5]}; HAProxy retried {retried:.0f} and redispatched "
          f"{redispatched:.0f}; slowest answer around the kill {worst * 1000:.0f} ms")
    assert not failed
    assert len(after) >= 40 and _servers(door)[survivor.name] == "UP"
    assert not pid_alive(victim.pid)


def test_the_cli_shows_and_stops_the_front_door(door, monkeypatch):
    """``serve mixer status`` finds the front door from the state folder's records (the killed
    replica shown not running and DOWN), ``serve mixer stop`` stops HAProxy and the live replica."""
    from home_mixer.cli import main

    door, _, state = door
    monkeypatch.setenv("HOME_MIXER_STATE", str(state.root))  # --state exports it: restore after

    def cli(*argv) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["--state", str(state.root), *argv])
        return code, out.getvalue()

    code, text = cli("serve", "mixer", "status", "--json")
    status = json.loads(text)
    assert code == 0 and status["running"] and status["url"] == door.url
    assert [(r["running"], r.get("haproxy")) for r in status["replicas"]] == [(False, "DOWN"), (True, "UP")]
    code, text = cli("serve", "mixer", "status")
    assert code == 0 and text.startswith(f"mixer front door: {door.url} (HAProxy pid {door.haproxy.pid}")
    pids = [door.haproxy.pid, door.servers[1].pid]
    assert cli("serve", "mixer", "stop") == (0, "mixer front door stopped (HAProxy and 2 replicas)\n")
    assert not any(pid_alive(p) for p in pids)
    assert cli("serve", "mixer", "status") == (1, "mixer: stopped\n")
