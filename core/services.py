"""Start and stop the local services home-mixer needs (Redis here; Triton/BentoML live in serving/).

Each service runs as a child process on a free loopback port; its pid and port are written to the
state folder's ``run/`` so another command (``home-mixer services stop``) can stop it by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from core.state import StateDir


class ServiceError(RuntimeError):
    """A service could not be started, reached or stopped; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feast_connection_string(redis_url: str) -> str:
    """``redis://[:password@]host:port[/db]`` -> Feast's ``host:port[,db=N][,password=P]``.

    Feast's RedisOnlineStoreConfig.connection_string takes ``host:port`` plus comma-separated
    redis-py keyword options; dropping the db or password would make Feast write elsewhere than the
    mixer reads.

    Raises:
        ValueError: not a ``redis://`` or ``rediss://`` URL.
    """
    from urllib.parse import urlparse

    u = urlparse(redis_url)
    if u.scheme not in ("redis", "rediss") or not u.hostname:
        raise ValueError(f"not a Redis URL: {redis_url!r} (expected redis://host:port/db)")
    parts = [f"{u.hostname}:{u.port or 6379}"]
    db = (u.path or "/").strip("/")
    if db and db != "0":
        parts.append(f"db={int(db)}")
    if u.password:
        parts.append(f"password={u.password}")
    if u.scheme == "rediss":
        parts.append("ssl=true")
    return ",".join(parts)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (from ``/proc/<pid>/stat``; empty without ``/proc``)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out



def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (a crash, not a stop: used to test fail-over)."""
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(child_pids(p))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """SIGTERM a process, then SIGKILL it if it is still alive after ``timeout_s`` seconds."""
    if not pid_alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return
        except ChildProcessError:
            pass  # not our child: poll liveness instead
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


@dataclass
class RedisServer:
    """A ``redis-server`` (Debian's package) on a free loopback port, data in ``state/redis``.

    AOF persistence is on (``appendfsync everysec``) so acknowledged writes survive a restart.
    """

    state: StateDir
    port: int | None = None
    pid: int | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise ServiceError("Redis is not started: run `home-mixer services start` first.")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def feast_connection_string(self) -> str:
        """Feast's RedisOnlineStoreConfig.connection_string form of ``url``."""
        return feast_connection_string(self.url)

    def _files(self) -> tuple[Path, Path]:
        return self.state.run / "redis.pid", self.state.run / "redis.port"

    @classmethod
    def running(cls, state: StateDir) -> "RedisServer | None":
        """The server recorded in the state folder, if its process is alive and answers PING."""
        srv = cls(state)
        pid_file, port_file = srv._files()
        if not (pid_file.exists() and port_file.exists()):
            return None
        srv.pid, srv.port = int(pid_file.read_text()), int(port_file.read_text())
        if not pid_alive(srv.pid):
            return None
        try:
            redis.Redis.from_url(srv.url, socket_timeout=1).ping()
        except redis.RedisError:
            return None
        return srv

    def start(self, timeout_s: float = 15.0) -> "RedisServer":
        """Start redis-server and wait until it answers PING.

        Raises:
            ServiceError: the binary is missing (install Debian's ``redis-server``: ``make setup``
                does it) or the server did not answer within ``timeout_s`` seconds.
        """
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceError(
                "redis-server not found on PATH. Install it with `apt-get install -y redis-server` "
                "(scripts/setup.sh does this) or set HOME_MIXER_REDIS_URL to an existing server."
            )
        self.state.ensure()
        self.port = self.port or free_port()
        with open(self.state.redis / "redis.log", "ab") as log:  # the child keeps its own copy
            proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.state.redis),
                 "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                 "--protected-mode", "yes", "--daemonize", "no"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        self.pid = proc.pid
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                break
            except redis.RedisError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise ServiceError(
                        f"redis-server did not start on port {self.port}; see {self.state.redis / 'redis.log'}"
                    ) from None
                time.sleep(0.05)
        pid_file, port_file = self._files()
        pid_file.write_text(str(self.pid))
        port_file.write_text(str(self.port))
        return self

    def stop(self) -> None:
        """Stop the server by pid and forget it."""
        if self.pid is not None:
            stop_pid(self.pid)
        for f in self._files():
            f.unlink(missing_ok=True)
        self.pid = None
