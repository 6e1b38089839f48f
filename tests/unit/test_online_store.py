"""The online-store address (``core.online_store``): the three forms, the errors for bad ones, Feast's
fields, and the clients they open (no I/O: redis-py connects on the first command)."""

from __future__ import annotations

import pytest
import redis

from core.online_store import (
    OnlineStoreAddressError,
    cluster_address,
    cluster_client,
    current_primary,
    ReplicaFallbackRedis,
    connect,
    feast_online_store,
    has_replica_reads,
    parse_address,
    sentinel_address,
)
from feature_repo.store import _online_client, feast_env


def test_single_redis_url():
    a = parse_address("redis://:pw@127.0.0.1:6390/3")
    assert not a.ha and a.db == 3 and a.password == "pw" and a.sentinels == ()
    assert str(a) == "redis://:***@127.0.0.1:6390/3"  # the password never reaches a log line


def test_sentinel_address():
    a = parse_address("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380,sentinel.local:26381/home-mixer/2")
    assert a.ha and a.service == "home-mixer" and a.db == 2 and a.password == "pw"
    assert a.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("sentinel.local", 26381))
    assert parse_address("redis+sentinel://127.0.0.1:1/svc").db == 0  # the database is optional


def test_sentinel_address_round_trips():
    text = sentinel_address([("127.0.0.1", 5001), ("127.0.0.1", 5002)], "home-mixer", 4)
    assert text == "redis+sentinel://127.0.0.1:5001,127.0.0.1:5002/home-mixer/4"
    assert parse_address(text).sentinels == (("127.0.0.1", 5001), ("127.0.0.1", 5002))


@pytest.mark.parametrize("address, says", [
    ("", "no online-store address"),
    ("127.0.0.1:6379", "has no scheme"),
    ("http://127.0.0.1:6379", "unknown scheme 'http'"),
    ("redis+sentinel://127.0.0.1:26379", "no service name"),
    ("redis+sentinel://127.0.0.1/home-mixer", "needs host:port"),
    ("redis+sentinel://127.0.0.1:x/home-mixer", "port 'x' is not a number"),
    ("redis+sentinel://127.0.0.1:70000/home-mixer", "out of range"),
    ("redis+sentinel://127.0.0.1:1,,127.0.0.1:2/home-mixer", "an empty Sentinel"),
    ("redis+sentinel://127.0.0.1:1/home mixer/0", "may hold only letters"),
    ("redis+sentinel://127.0.0.1:1/home-mixer/zero", "database 'zero' is not a number"),
    ("redis+sentinel://127.0.0.1:1/home-mixer/0/extra", "too many path segments"),
    ("redis:///0", "has no host"),
    ("redis+cluster://", "an empty cluster node"),
    ("redis+cluster://127.0.0.1", "cluster node '127.0.0.1' needs host:port"),
    ("redis+cluster://127.0.0.1:1,127.0.0.1:y", "port 'y' is not a number"),
    ("redis+cluster://127.0.0.1:1/3", "only database 0"),
    ("redis+cluster://127.0.0.1:1/home-mixer/0", "only database 0"),
])
def test_bad_addresses_say_what_was_wrong_and_what_to_write(address, says):
    with pytest.raises(OnlineStoreAddressError) as e:
        parse_address(address)
    assert says in str(e.value)
    assert "redis+sentinel://host:port" in str(e.value)  # the forms to write instead
    assert "redis+cluster://host:port" in str(e.value)


def test_cluster_address():
    a = parse_address("redis+cluster://:pw@10.0.0.1:7000,[::1]:7001,node.local:7002")
    assert a.cluster and not a.ha and a.db == 0 and a.password == "pw" and a.sentinels == ()
    assert a.cluster_nodes == (("10.0.0.1", 7000), ("::1", 7001), ("node.local", 7002))
    assert parse_address("redis+cluster://127.0.0.1:7000/0").cluster_nodes == (("127.0.0.1", 7000),)
    text = cluster_address([("127.0.0.1", 7000), ("127.0.0.1", 7001)], password="pw")
    assert text == "redis+cluster://:pw@127.0.0.1:7000,127.0.0.1:7001" and str(parse_address(text)).count("***") == 1
    with pytest.raises(OnlineStoreAddressError, match="one primary per shard"):
        current_primary(text)
    with pytest.raises(OnlineStoreAddressError, match="not a cluster address"):
        cluster_client("redis://127.0.0.1:1/0")


def test_connect_cluster_needs_a_node_that_answers():
    """redis-py's RedisCluster asks a startup node for the slot map at once: no cluster there is a
    RedisClusterException naming the nodes, not a client that fails later."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from core.services import free_port

    port = free_port()
    with pytest.raises(redis.exceptions.RedisClusterException):
        connect(f"redis+cluster://127.0.0.1:{port}", socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0))


def test_feast_fields_single_sentinel_and_cluster():
    assert feast_online_store("redis://127.0.0.1:6390/3") == {
        "connection_string": "127.0.0.1:6390,db=3", "redis_type": "redis", "sentinel_master": "mymaster"}
    assert feast_online_store("redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/home-mixer/5") == {
        "connection_string": "127.0.0.1:1,127.0.0.1:2,db=5,password=pw", "redis_type": "redis_sentinel",
        "sentinel_master": "home-mixer"}
    fields = feast_online_store("redis+cluster://:pw@127.0.0.1:1,127.0.0.1:2")
    assert fields["connection_string"] == "127.0.0.1:1,127.0.0.1:2,password=pw"
    assert fields["redis_type"] == "redis_cluster"


def test_feast_env_takes_an_address_or_feasts_own_form(tmp_path):
    from core.state import StateDir

    state = StateDir(tmp_path)
    env = feast_env(state, "redis+sentinel://127.0.0.1:1,127.0.0.1:2/home-mixer/0")
    assert env["HOME_MIXER_REDIS"] == "127.0.0.1:1,127.0.0.1:2"
    assert env["HOME_MIXER_REDIS_TYPE"] == "redis_sentinel" and env["HOME_MIXER_REDIS_SENTINEL_MASTER"] == "home-mixer"
    assert feast_env(state, "127.0.0.1:6380,db=2")["HOME_MIXER_REDIS_TYPE"] == "redis"


def test_connect_single_is_a_plain_client():
    client = connect("redis://127.0.0.1:6390/3", socket_timeout=0.5)
    kwargs = client.connection_pool.connection_kwargs
    assert type(client) is redis.Redis and kwargs["port"] == 6390 and kwargs["db"] == 3
    assert not has_replica_reads(connect("redis://127.0.0.1:6390/3", replica_reads=True))  # no replica to read


def test_connect_sentinel_master_and_replica_reads():
    from redis.sentinel import SentinelConnectionPool

    address = "redis+sentinel://:pw@127.0.0.1:1,127.0.0.1:2/home-mixer/4"
    plain = connect(address)
    assert isinstance(plain.connection_pool, SentinelConnectionPool) and plain.connection_pool.is_master
    assert plain.connection_pool.service_name == "home-mixer"
    assert plain.connection_pool.connection_kwargs["db"] == 4
    assert plain.connection_pool.connection_kwargs["password"] == "pw"
    reading = connect(address, replica_reads=True, replica_window_s=0.25)
    assert isinstance(reading, ReplicaFallbackRedis) and has_replica_reads(reading)
    assert reading.replica.connection_pool.is_master is False and reading.replica_window_s == 0.25


def test_feast_connection_string_back_to_a_sentinel_client():
    """``materialize`` bumps the feature version through the client Feast's fields describe."""
    client = _online_client("127.0.0.1:1,127.0.0.1:2,db=3", redis_type="redis_sentinel", sentinel_master="home-mixer")
    pool = client.connection_pool
    assert pool.service_name == "home-mixer" and pool.connection_kwargs["db"] == 3
    assert [(s.connection_pool.connection_kwargs["port"]) for s in pool.sentinel_manager.sentinels] == [1, 2]
