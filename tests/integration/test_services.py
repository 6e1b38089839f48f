import pytest
import redis

from home_mixer.services import RedisServer, pid_alive
from home_mixer.state import StateDir

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
