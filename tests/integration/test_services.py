"""The process supervisor (core.services.ManagedProcess) on real processes: redis-server, and
small real process trees (a python HTTP server with sleeping children, one in its own session like
BentoML's workers). No mocks: every pid checked here is a real process."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from typing import ClassVar

import psutil
import pytest
import redis

from core.services import (
    ManagedProcess, RedisServer, ServiceError, free_port, kill_tree, pid_alive, stop_recorded,
)
from core.state import StateDir

pytestmark = pytest.mark.integration


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@dataclass
class TreeService(ManagedProcess):
    """``python -m http.server`` with two sleeping children, one in a session of its own."""

    port: int | None = None
    ignore_sigterm: bool = False

    service: ClassVar[str] = "tree"
    cmdline_marker: ClassVar[str] = "http.server"
    start_timeout_s: ClassVar[float] = 20.0

    def command(self) -> list[str]:
        trap = "trap '' TERM; " if self.ignore_sigterm else ""  # inherited across exec: SIGTERM ignored
        return ["bash", "-c", f"{trap}sleep 300 & setsid sleep 300 & "
                              f"exec {sys.executable} -m http.server {self.port} --bind 127.0.0.1"]

    def ready(self) -> bool:
        return _listening(self.port)


@dataclass
class NeverReady(ManagedProcess):
    """Starts, prints, spawns children, and never passes its readiness probe."""

    seen: list | None = None

    service: ClassVar[str] = "never"
    port_fields: ClassVar[tuple[str, ...]] = ()

    def command(self) -> list[str]:
        return ["bash", "-c", "echo 'warming up forever'; sleep 300 & setsid sleep 300 & wait"]

    def ready(self) -> bool:
        if self.seen is not None and self.pid is not None:
            try:
                self.seen.extend(c.pid for c in psutil.Process(self.pid).children(recursive=True)
                                 if c.pid not in self.seen)
            except psutil.Error:
                pass
        return False


@dataclass
class ExitsAtStart(ManagedProcess):
    service: ClassVar[str] = "exits"
    port_fields: ClassVar[tuple[str, ...]] = ()

    def command(self) -> list[str]:
        return ["bash", "-c", "echo 'bad config: no model named foo' >&2; exit 3"]

    def ready(self) -> bool:
        return False


def _tree_pids(pid: int) -> list[int]:
    return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]


def _wait_children(pid: int, n: int, timeout_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = _tree_pids(pid)
        if len(pids) >= n + 1:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} has {len(_tree_pids(pid)) - 1} descendants, expected {n}")


# ---------------------------------------------------------------- Redis


def test_redis_server_starts_on_free_port_persists_and_stops(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = RedisServer(state).start()
    try:
        assert RedisServer.running(state).port == srv.port
        client = redis.Redis.from_url(srv.url)
        client.set("k", "v")
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.get("k") == b"v"
        status = RedisServer.find(state).status()
        assert status["running"] and status["ready"] and status["pid"] == srv.pid
        assert status["address"] == srv.url and status["ports"] == {"port": srv.port}
        client.close()
    finally:
        pid = srv.pid
        srv.stop()
    assert not pid_alive(pid)
    assert RedisServer.running(state) is None and RedisServer.find(state) is None


def test_redis_keeps_its_port_and_data_across_restarts(tmp_path):
    state = StateDir(tmp_path).ensure()
    first = RedisServer(state).start()
    port = first.port
    redis.Redis.from_url(first.url).set("kept", "yes")
    first.stop()
    record = json.loads((state.run / "redis.json").read_text())
    assert record == {"service": "redis", "ports": {"port": port}}  # pid gone, port kept
    second = RedisServer(state).start()  # a new object: the port comes from the record
    try:
        assert second.port == port and second.pid != first.pid
        assert redis.Redis.from_url(second.url).get("kept") == b"yes"  # AOF reloaded
    finally:
        second.stop()


def test_a_crashed_redis_restarts_on_the_same_port_with_its_data(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = RedisServer(state).start()
    port, crashed = srv.port, srv.pid
    client = redis.Redis.from_url(srv.url)
    client.set("acked", "1")  # in the AOF (the kernel's page cache) once acknowledged
    srv.kill()
    deadline = time.monotonic() + 5
    while pid_alive(crashed) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(crashed) and RedisServer.running(state) is None
    srv.start()  # the same object: same port, same data folder
    try:
        assert srv.port == port and srv.pid != crashed
        assert client.get("acked") == b"1"
    finally:
        client.close()
        srv.stop()


def test_redis_starts_elsewhere_when_its_recorded_port_is_taken(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = RedisServer(state).start()
    port = srv.port
    srv.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        moved = RedisServer(state).start()
        try:
            assert moved.port != port and RedisServer.running(state).port == moved.port
        finally:
            moved.stop()
        with pytest.raises(ServiceError, match=f"port {port} on 127.0.0.1 .* is in use"):
            RedisServer(state, port=port).start()  # an explicit port is not moved
    assert RedisServer.find(state) is None


def test_second_start_is_refused_while_running(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = RedisServer(state).start()
    try:
        with pytest.raises(ServiceError, match="redis is already running .*stop it first"):
            RedisServer(state).start()
    finally:
        srv.stop()


def test_url_before_start_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="services start"):
        RedisServer(StateDir(tmp_path)).url


# ---------------------------------------------------------------- process trees


def test_start_status_stop_of_a_process_tree_stops_every_descendant(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = TreeService(state).start()
    pids = _wait_children(srv.pid, 2)
    deadline = time.monotonic() + 5
    while len({os.getsid(p) for p in pids}) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len({os.getsid(p) for p in pids}) == 2  # one child runs in a session of its own
    found = TreeService.find(state)
    assert found is not None and (found.pid, found.port) == (srv.pid, srv.port)
    status = found.status()
    assert status["running"] and status["ready"] and status["log"].endswith("tree.log")
    found.stop()  # another object, as a CLI `stop` would have
    assert not any(pid_alive(p) for p in pids), [p for p in pids if pid_alive(p)]
    assert TreeService.find(state) is None and not _listening(srv.port)
    assert "home-mixer starts" in (state.run / "tree.log").read_text()


def test_sigterm_ignored_gets_sigkill_after_the_timeout(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = TreeService(state, ignore_sigterm=True).start()
    pids = _wait_children(srv.pid, 2)
    started = time.monotonic()
    srv.stop(timeout_s=1.0)
    took = time.monotonic() - started
    assert not any(pid_alive(p) for p in pids)
    assert 1.0 <= took < 15.0, took


def test_kill_tree_is_a_crash_of_the_whole_tree(tmp_path):
    state = StateDir(tmp_path).ensure()
    srv = TreeService(state).start()
    pids = _wait_children(srv.pid, 2)
    kill_tree(srv.pid)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in pids)
    assert TreeService.find(state) is None  # the record's process is gone (a zombie is not alive)
    srv.stop()  # collects the exit status; nothing left to signal
    assert json.loads((state.run / "tree.json").read_text())["ports"] == {"port": srv.port}


def test_a_stale_or_recycled_pid_is_not_running_and_never_signalled(tmp_path):
    state = StateDir(tmp_path).ensure()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (state.run / "tree.json").write_text(json.dumps(
        {"service": "tree", "ports": {"port": free_port()}, "pid": gone.pid, "create_time": time.time() - 5}))
    assert TreeService.find(state) is None and TreeService.running(state) is None

    # a live process under a recorded pid, but started at another time: the pid was recycled
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "http.server"])
    try:
        created = psutil.Process(other.pid).create_time()
        (state.run / "tree.json").write_text(json.dumps(
            {"service": "tree", "ports": {"port": free_port()}, "pid": other.pid, "create_time": created - 100}))
        assert TreeService.find(state) is None
        TreeService(state, pid=other.pid, create_time=created - 100).stop()
        assert other.poll() is None and pid_alive(other.pid)  # not ours: left alone
        srv = TreeService(state).start()  # a stale record does not block a start
        srv.stop()
    finally:
        other.kill()
        other.wait()


def test_a_process_that_never_becomes_ready_fails_clearly_and_leaves_nothing(tmp_path):
    state = StateDir(tmp_path).ensure()
    seen: list[int] = []
    srv = NeverReady(state, seen=seen)
    started = time.monotonic()
    with pytest.raises(ServiceError) as err:
        srv.start(timeout_s=1.5)
    message = str(err.value)
    assert "never was not ready within 2 s" in message and "warming up forever" in message
    assert str(state.run / "never.log") in message
    assert time.monotonic() - started < 15
    assert len(seen) >= 2, seen
    assert not any(pid_alive(p) for p in seen)
    assert srv.pid is None and NeverReady.find(state) is None
    assert "pid" not in json.loads((state.run / "never.json").read_text())


def test_a_process_that_exits_while_starting_says_why(tmp_path):
    state = StateDir(tmp_path).ensure()
    with pytest.raises(ServiceError, match=r"(?s)exits exited with code 3 while starting.*bad config: no model named foo"):
        ExitsAtStart(state).start(timeout_s=10)
    assert ExitsAtStart.find(state) is None


def test_a_mixer_that_cannot_start_reports_its_log_and_leaves_nothing(tmp_path):
    """The real mixer process (``python -m mixer.api``) pointed at a Redis nobody runs."""
    from mixer.server import MixerServer

    state = StateDir(tmp_path).ensure()
    srv = MixerServer(state, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ServiceError, match=r"(?s)mixer exited with code \d+ while starting.*Connection refused"):
        srv.start(timeout_s=120)
    assert MixerServer.find(state) is None and srv.pid is None
    assert json.loads((state.run / "mixer.json").read_text()) == {"service": "mixer", "ports": {"port": srv.port}}


def test_stop_recorded_stops_every_service_of_the_state_folder(tmp_path):
    state = StateDir(tmp_path).ensure()
    rds = RedisServer(state).start()
    tree = TreeService(state).start()
    pids = [rds.pid, *_wait_children(tree.pid, 2)]
    assert sorted(stop_recorded(state)) == ["redis", "tree"]
    assert not any(pid_alive(p) for p in pids)
    assert RedisServer.find(state) is None and TreeService.find(state) is None


# ---------------------------------------------------------------- the CLI, written once


def test_services_cli_start_status_stop(tmp_path, monkeypatch):
    from home_mixer.cli import main

    monkeypatch.setenv("HOME_MIXER_STATE", str(tmp_path / "state"))  # --state exports it: restore after

    def cli(*argv) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main(["--state", str(tmp_path / "state"), *argv])
        return code, out.getvalue()

    assert cli("services", "status") == (1, "redis: stopped\n")
    code, text = cli("services", "start")
    assert code == 0 and text.startswith("redis started: redis://127.0.0.1:")
    try:
        code, text = cli("services", "status", "--json")
        status = json.loads(text)
        assert code == 0 and status["running"] and status["ready"]
        assert cli("services", "start")[1].startswith("redis already running: ")
        code, text = cli("services", "status")
        assert code == 0 and text.startswith(f"redis: running {status['address']} (pid {status['pid']}, ready")
    finally:
        assert cli("services", "stop") == (0, "redis stopped\n")
    assert not pid_alive(status["pid"])
    assert cli("services", "stop") == (0, "redis is not running\n")


def test_services_start_after_a_sigkill_comes_back_on_the_recorded_port(tmp_path, monkeypatch):
    """kill -9 of redis-server, then `home-mixer services start` (a new process reading the record):
    the same port, so the mixer's client reconnects to the address it knows."""
    from home_mixer.cli import main

    monkeypatch.setenv("HOME_MIXER_STATE", str(tmp_path / "state"))
    state = StateDir(tmp_path / "state").ensure()
    first = RedisServer(state).start()
    port, crashed = first.port, first.pid
    os.kill(crashed, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(crashed) and time.monotonic() < deadline:
        time.sleep(0.02)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--state", str(state.root), "services", "start"]) == 0
    try:
        again = RedisServer.running(state)
        assert again is not None and again.port == port and again.pid != crashed, out.getvalue()
        assert f"redis://127.0.0.1:{port}/0" in out.getvalue()
    finally:
        with redirect_stdout(io.StringIO()):
            main(["--state", str(state.root), "services", "stop"])


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
