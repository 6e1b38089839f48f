"""The Redis Cluster online store (issue 21, must-have 2): ``home-mixer services start --cluster 3``
starts 3 primaries and 3 replicas of Debian's ``redis-server`` joined by ``redis-cli --cluster
create``, and every client reaches it through ``redis+cluster://`` (redis-py's ``RedisCluster``).

Everything is real: the session's cluster (``tests/conftest.py``'s ``redis_cluster``), the CLI, and
the clients of ``core.online_store.connect``.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import pytest

from core.online_store import connect, parse_address
from core.services import CLUSTER_SLOTS, RedisCluster, ServiceError
from core.state import StateDir

pytestmark = [pytest.mark.integration, pytest.mark.cluster]


def _cli(state: StateDir, *argv) -> tuple[int, str, str]:
    from home_mixer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["--state", str(state.root), *argv])
    return code, out.getvalue(), err.getvalue()


def _roles(status: dict) -> dict[int, str]:
    return {m["ports"]["port"]: m["role"] for m in status["members"]}


def test_services_cluster_status_stop_and_restart_keep_roles_slots_and_data(redis_cluster):
    """``status`` shows 3 primaries + 3 replicas with every slot served; after ``stop`` and ``start
    --cluster 3`` every node is back on its recorded port with its role (nodes.conf kept), and an
    acknowledged write is still there (AOF)."""
    state = redis_cluster.state
    code, out, _ = _cli(state, "services", "status", "--json")
    before = json.loads(out)
    assert code == 0 and before["ready"] and before["shards"] == 3, before
    roles = _roles(before)
    assert sorted(roles.values()) == ["master"] * 3 + ["slave"] * 3
    address = before["address"]
    assert parse_address(address).cluster_nodes == tuple(("127.0.0.1", p) for p in roles)
    client = connect(address)
    slots = client.cluster_slots()
    assert sum(end - start + 1 for start, end in slots) == CLUSTER_SLOTS
    # keys land on every primary (no node left idle), and a write is acknowledged
    for i in range(30):
        client.set(f"restart-probe-{i}", i)
    owners = {client.get_node_from_key(f"restart-probe-{i}").port for i in range(30)}
    assert owners == {p for p, r in roles.items() if r == "master"}
    client.wait(1, 2000)  # in the replicas too, before the stop
    client.close()

    code, out, _ = _cli(state, "services", "stop")
    assert code == 0 and "redis cluster stopped (6 nodes)" in out
    assert RedisCluster.find(state) is None
    code, out, _ = _cli(state, "services", "status")
    assert code == 1 and "redis: stopped" in out
    # one online store per state folder, and one cluster size per state folder
    with pytest.raises(ServiceError, match="holds a cluster of 3 primaries, not 4"):
        RedisCluster(state, shards=4)

    code, out, err = _cli(state, "services", "start", "--cluster", "3")
    assert code == 0 and out.startswith(f"redis cluster started: {address} "), (out, err)
    code, out, _ = _cli(state, "services", "status", "--json")
    after = json.loads(out)
    assert after["ready"] and _roles(after) == roles
    client = connect(address)
    assert [int(client.get(f"restart-probe-{i}")) for i in range(30)] == list(range(30))
    code, _, err = _cli(state, "services", "start")
    assert code == 2 and "Redis Cluster runs for" in err  # the single Redis is refused meanwhile
    client.close()


def test_cluster_client_reads_from_replicas_and_refuses_cross_slot_scripts(cluster_client, redis_cluster):
    """``replica_reads`` is redis-py's ``read_from_replicas``; a script over two slots is refused
    by the client before it reaches a node (so no half-applied script), one over one hash tag runs."""
    import redis

    reading = connect(redis_cluster.address, replica_reads=True)
    assert reading.read_from_replicas
    cluster_client.set("{u:1}:a", "1")
    cluster_client.wait(1, 2000)
    assert reading.get("{u:1}:a") == b"1"
    with pytest.raises(redis.exceptions.RedisClusterException, match="same key slot"):
        cluster_client.eval("return 1", 2, "hm:a", "hm:b")
    assert cluster_client.eval("return redis.call('GET', KEYS[1])", 2, "{u:1}:a", "{u:1}:b") == b"1"
    reading.close()
