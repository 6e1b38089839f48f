import pytest
import redis

from core.services import RedisServer, pid_alive
from core.state import StateDir

pytestmark = pytest.mark.integration


def test_redis_server_starts_on_free_port_persists_and_stops(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = RedisServer(state).start()
    try:
        assert RedisServer.running(state).port == srv.port
        client = redis.Redis.from_url(srv.url)
        client.set("k", "v")
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.get("k") == b"v"
    finally:
        pid = srv.pid
        srv.stop()
    assert not pid_alive(pid)
    assert RedisServer.running(state) is None


def test_url_before_start_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="services start"):
        RedisServer(StateDir(tmp_path)).url


@pytest.mark.parametrize("url,expected", [
    ("redis://127.0.0.1:6380/0", "127.0.0.1:6380"),
    ("redis://127.0.0.1:6380/3", "127.0.0.1:6380,db=3"),
    ("redis://:s3cret@cache.local:6390/1", "cache.local:6390,db=1,password=s3cret"),
    ("rediss://cache.local", "cache.local:6379,ssl=true"),
])
def test_feast_connection_string_keeps_db_and_password(url, expected):
    from core.services import feast_connection_string

    assert feast_connection_string(url) == expected


def test_feast_connection_string_rejects_other_urls():
    from core.services import feast_connection_string

    with pytest.raises(ValueError, match="not a Redis URL"):
        feast_connection_string("http://127.0.0.1:6379")
