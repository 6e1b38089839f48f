"""One process supervisor for the local services home-mixer starts (Redis, Triton, BentoML, the mixer).

:class:`ManagedProcess` owns everything about a service process, on ``psutil`` (no ``/proc``
parsing):

- **ports**: each port the service listens on is chosen once (a free loopback port, or the one
  given) and recorded in the state folder's ``run/<name>.json``; a later start reuses the recorded
  port while it is free, so a restart keeps the address its clients know;
- **start**: the command runs in its own session with its output appended to a log file; the
  record (pid, process start time, ports) is written at once; start waits for the readiness probe
  up to a timeout and, on exit, timeout, an early failure or Ctrl-C, stops the whole process tree
  and raises :class:`ServiceError` quoting the end of the log: nothing is left running;
- **discovery**: :meth:`ManagedProcess.find` / :meth:`ManagedProcess.running` rebuild the service
  from its record in another process (a CLI ``stop``); a pid whose process is gone, a zombie, or a
  recycled pid (another start time) is not ours;
- **stop**: SIGTERM the root, wait, SIGKILL it, then the same for every descendant recorded before
  signalling (workers in sessions of their own included); :func:`kill_tree` SIGKILLs a tree at
  once (a crash, for fail-over tests).

A service is a small subclass: ``service`` (record name), ``port_fields``, :meth:`command`,
:meth:`ready` and optionally :meth:`environment`, :meth:`prepare`, :meth:`start_failure`,
:meth:`live`. :class:`RedisServer` (the single online store) and the HA set's :class:`RedisNode` and
:class:`RedisSentinel`, started together by :class:`RedisHA` (``services start --ha``), are here;
``serving.triton.server.TritonServer``,
``serving.bento.server.BentoServer`` and ``mixer.server.MixerServer`` are the others. The CLI that
starts, stops and shows them is written once, in ``home_mixer/cli.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import psutil
import redis

from core.state import StateDir

CREATE_TIME_TOLERANCE_S = 1.0  # a recorded start time matches the live process within this
PORT_RELEASE_S = 3.0  # how long a start waits for a just-stopped service to release its port


class ServiceError(RuntimeError):
    """A service could not be started, reached or stopped; the message says what to do."""


# ---------------------------------------------------------------- ports


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free when asked (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    """True when ``GET url`` answers 200 within ``timeout_s``; False on any HTTP or connection
    error (a readiness / liveness probe: never raises)."""
    import httpx

    try:
        return httpx.get(url, timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could listen on ``host:port`` now (connections in TIME_WAIT do not count,
    as servers set ``SO_REUSEADDR``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
        except OSError:
            return False
        return True


def wait_port_free(port: int, timeout_s: float, host: str = "127.0.0.1") -> bool:
    """:func:`port_is_free`, polled for up to ``timeout_s`` seconds (every 50 ms).

    A service that was just stopped or killed can hold its port a moment longer (a forked child,
    such as Redis's AOF-rewrite child, exits after its parent), so a restart waits for it rather
    than moving to another address.
    """
    deadline = time.monotonic() + timeout_s
    while not port_is_free(port, host):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


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


# ---------------------------------------------------------------- processes (psutil)


def _process(pid: int, create_time: float | None = None) -> psutil.Process | None:
    """The live (non-zombie) process ``pid``, or None; with ``create_time``, only if it started then."""
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if create_time is not None and abs(proc.create_time() - create_time) > CREATE_TIME_TOLERANCE_S:
            return None  # the pid was recycled by another process
        return proc
    except psutil.AccessDenied:
        return psutil.Process(int(pid)) if create_time is None else None
    except (psutil.NoSuchProcess, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (an exited child nobody has waited for)."""
    return _process(pid) is not None


def child_pids(pid: int) -> list[int]:
    """Pids of the direct children of ``pid`` (empty if it is gone)."""
    try:
        return [c.pid for c in psutil.Process(int(pid)).children()]
    except psutil.Error:
        return []


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """``proc`` and all its descendants (descendants that vanish meanwhile are skipped)."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _reap(proc: psutil.Process) -> None:
    """Collect the exit status of ``proc`` if it is our child (so it does not linger as a zombie)."""
    try:
        os.waitpid(proc.pid, os.WNOHANG)
    except (ChildProcessError, OSError):
        pass


def _gone(proc: psutil.Process) -> bool:
    _reap(proc)
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _wait_gone(procs: Iterable[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Wait up to ``timeout_s`` seconds for ``procs`` to exit; returns those still alive."""
    alive = list(procs)
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in alive if not _gone(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)  # psutil refuses a recycled pid (NoSuchProcess)
        except psutil.Error:
            pass


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants at once (a crash, not a stop: used to test fail-over).

    A pid that no longer exists is ignored. The killed processes are not waited for.
    """
    proc = _process(pid)
    if proc is not None:
        _signal(_tree(proc), signal.SIGKILL)


def stop_tree(pid: int, timeout_s: float = 10.0, create_time: float | None = None,
              children_timeout_s: float = 5.0) -> None:
    """Stop ``pid`` and its whole process tree gracefully.

    The descendants are listed first (workers that run in sessions of their own included), then the
    root gets SIGTERM and ``timeout_s`` seconds to exit (it usually stops its workers itself),
    then SIGKILL. Descendants still alive then get SIGTERM, ``children_timeout_s`` seconds, then
    SIGKILL. Our own children are reaped (no zombies left).

    Args:
        pid: root process id; nothing happens if it is gone.
        timeout_s: seconds the root gets between SIGTERM and SIGKILL.
        create_time: the root's recorded start time (``psutil`` epoch seconds); if given and the
            live process started at another time, the pid was recycled and nothing is signalled.
        children_timeout_s: seconds leftover descendants get between SIGTERM and SIGKILL.
    """
    root = _process(pid, create_time)
    if root is None:
        try:
            _reap(psutil.Process(int(pid)))  # an exited child of ours: collect it
        except psutil.Error:
            pass
        return
    descendants = _tree(root)[1:]
    _signal([root], signal.SIGTERM)
    if _wait_gone([root], timeout_s):
        _signal([root], signal.SIGKILL)
        _wait_gone([root], 5.0)
    left = _wait_gone(descendants, 0.5)  # workers usually exit with their parent
    if left:
        _signal(left, signal.SIGTERM)
        left = _wait_gone(left, children_timeout_s)
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 2.0)


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """Stop process ``pid`` and its descendants: :func:`stop_tree` (SIGTERM, then SIGKILL after
    ``timeout_s`` seconds)."""
    stop_tree(pid, timeout_s)


def log_tail(path: Path, lines: int = 25) -> str:
    """The last ``lines`` lines of a service's log (``"(no log)"`` if it has none), for error messages."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# ---------------------------------------------------------------- the supervisor


@dataclass
class ManagedProcess:
    """A service process supervised through the state folder (see the module docstring).

    Subclasses are dataclasses that add their port fields (``port_fields`` names them, e.g.
    ``port`` or ``http_port``/``grpc_port``) and settings, and define :meth:`command` and
    :meth:`ready`. Class attributes:

    - ``service``: record name (``run/<service>.json``) and the name in messages;
    - ``port_fields``: attributes holding the TCP ports (int or None = choose);
    - ``record_fields``: attributes saved in the record and passed back to the constructor by
      :meth:`find` (JSON-able: str, Path, int, lists/tuples of those);
    - ``cmdline_marker``: a string the process's command line contains (a second identity check);
    - ``start_timeout_s`` / ``stop_timeout_s``: defaults in seconds;

    Attributes:
        state: the state folder (record in ``state.run``).
        pid: root process id once started or found; None otherwise.
        started_seconds: how long the last :meth:`start` took until ready (seconds).
        create_time: the root process's start time (epoch seconds, from psutil), recorded to tell
            our process from a recycled pid.
    """

    state: StateDir
    pid: int | None = None
    started_seconds: float | None = field(default=None, compare=False)
    create_time: float | None = field(default=None, compare=False, repr=False)

    service: ClassVar[str] = "service"
    port_fields: ClassVar[tuple[str, ...]] = ("port",)
    record_fields: ClassVar[tuple[str, ...]] = ()
    cmdline_marker: ClassVar[str] = ""
    start_timeout_s: ClassVar[float] = 60.0
    stop_timeout_s: ClassVar[float] = 10.0

    # ------------------------------------------------------------ what a subclass defines

    def command(self) -> list[str]:
        """The command line (ports are set when it is called)."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Readiness probe: True once the service answers and can take requests. Must not raise."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """Environment of the process (None: this process's)."""
        return None

    def cwd(self) -> Path | None:
        """Working directory of the process (None: this process's)."""
        return None

    def prepare(self) -> None:
        """Checks before anything is started (binary installed, inputs present); raise ServiceError
        (or a more specific error) with what to do."""

    def start_failure(self) -> str | None:
        """While not ready: a message if the service already knows it cannot become ready (start
        then stops at once instead of waiting for the timeout), else None."""
        return None

    def live(self) -> bool:
        """Liveness probe used by :meth:`running` (default: the process being alive is enough)."""
        return True

    @property
    def log_file(self) -> Path:
        """Where the process's stdout and stderr are appended (default ``run/<record>.log``)."""
        return self.state.run / f"{self.record_name}.log"

    @property
    def address(self) -> str:
        """Where clients reach the service (one line, for the CLI)."""
        return ", ".join(f"{f} 127.0.0.1:{getattr(self, f)}" for f in self.port_fields)

    def status_extra(self) -> dict[str, Any]:
        """Service-specific fields added to :meth:`status` while running."""
        return {}

    # ------------------------------------------------------------ record

    @property
    def record_name(self) -> str:
        """File stem of this instance's record and log in ``run/`` (default ``service``)."""
        return self.service

    @property
    def record_file(self) -> Path:
        """``<state>/run/<record_name>.json``: ports (kept after stop), pid and start time."""
        return self.state.run / f"{self.record_name}.json"

    @property
    def ports(self) -> dict[str, int | None]:
        """``{port field: port}`` of this instance."""
        return {f: getattr(self, f) for f in self.port_fields}

    def _legacy_files(self) -> tuple[Path, Path]:
        return self.state.run / f"{self.record_name}.pid", self.state.run / f"{self.record_name}.port"

    def read_record(self) -> dict[str, Any]:
        """The record of this service in the state folder (``{}`` if none or unreadable).

        Keys: ``service``, ``ports`` (``{field: port}``), and while started ``pid``,
        ``create_time``, ``started_at`` (epoch seconds), ``command``, ``fields`` (the
        ``record_fields``). Pid and port files of earlier versions (``<name>.pid``/``.port``, a
        flat ``triton.json``) are read too, without a start time.
        """
        try:
            info = json.loads(self.record_file.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            if "ports" not in info:  # flat record of an earlier version
                info = {"pid": info.get("pid"), "ports": {f: info[f] for f in self.port_fields if f in info},
                        "fields": {f: info[f] for f in self.record_fields if f in info}}
            return info
        pid_file, port_file = self._legacy_files()
        try:
            return {"pid": int(pid_file.read_text()), "ports": {self.port_fields[0]: int(port_file.read_text())}}
        except (OSError, ValueError, IndexError):
            return {}

    def _write_record(self, info: dict[str, Any]) -> None:
        self.record_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.record_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, self.record_file)

    def _record_started(self, command: list[str]) -> None:
        def plain(v):
            return str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v

        self._write_record({
            "service": self.service, "ports": self.ports, "pid": self.pid, "create_time": self.create_time,
            "started_at": time.time(), "command": command,
            "fields": {f: plain(getattr(self, f)) for f in self.record_fields},
        })

    def _forget(self) -> None:
        """Drop pid and start time from the record (ports stay for the next start)."""
        info = self.read_record()
        if info.get("pid") in (self.pid, None):
            self._write_record({"service": self.service, "ports": info.get("ports") or self.ports})
        for f in self._legacy_files():
            f.unlink(missing_ok=True)
        self.pid = self.create_time = None

    # ------------------------------------------------------------ discovery

    def is_ours(self) -> bool:
        """True if ``pid`` is alive (not a zombie), started at the recorded time, and its command
        line has ``cmdline_marker``."""
        if self.pid is None:
            return False
        proc = _process(self.pid, self.create_time)
        if proc is None:
            return False
        if self.cmdline_marker:
            try:
                return self.cmdline_marker in " ".join(proc.cmdline())
            except psutil.Error:
                return False
        return True

    @classmethod
    def find(cls, state: StateDir, **kwargs) -> "ManagedProcess | None":
        """The service recorded in ``state`` if its process is alive and ours (ready, still starting
        or hung: see :meth:`running` for one that answers). ``kwargs`` go to the constructor
        (e.g. a mixer's ``name``)."""
        probe = cls(state, **kwargs)
        info = probe.read_record()
        if info.get("pid") is None:
            return None
        fields = {k: v for k, v in (info.get("fields") or {}).items() if k in cls.record_fields and k not in kwargs}
        srv = cls(state, **fields, **kwargs)
        srv.pid, srv.create_time = int(info["pid"]), info.get("create_time")
        for f, port in (info.get("ports") or {}).items():
            if f in cls.port_fields and port is not None:
                setattr(srv, f, int(port))
        if not srv.is_ours():
            return None
        if srv.create_time is None and not srv.live():  # an earlier version's record: the probe decides
            return None
        return srv

    @classmethod
    def running(cls, state: StateDir, **kwargs) -> "ManagedProcess | None":
        """:meth:`find`, and only if the service passes its liveness probe (:meth:`live`)."""
        srv = cls.find(state, **kwargs)
        return srv if srv is not None and srv.live() else None

    # ------------------------------------------------------------ lifecycle

    def _choose_ports(self) -> None:
        recorded = self.read_record().get("ports") or {}
        taken: set[int] = set()
        for f in self.port_fields:
            port = getattr(self, f)
            if port is not None:
                if not wait_port_free(port, PORT_RELEASE_S):
                    raise ServiceError(f"port {port} on 127.0.0.1 ({self.service} {f}) is in use: pick another "
                                       "port, or stop what listens there")
            else:
                port = recorded.get(f)
                if port is None or int(port) in taken or not wait_port_free(int(port), PORT_RELEASE_S):
                    port = free_port()
                    while port in taken:
                        port = free_port()
            setattr(self, f, int(port))
            taken.add(int(port))

    def start(self, timeout_s: float | None = None) -> "ManagedProcess":
        """Start the service and wait until :meth:`ready` (the record is written at once).

        Args:
            timeout_s: seconds to wait for readiness (default ``start_timeout_s``).

        Returns:
            self, with ``pid``, the ports and ``started_seconds`` set.

        Raises:
            ServiceError: a process of this service is already recorded as running for the state
                folder, a given port is in use, or the process exited, reported an early failure
                or was not ready within ``timeout_s`` (the message has the end of its log). The
                whole process tree is stopped and the pid forgotten in each case.
            whatever :meth:`prepare` raises (missing binary or inputs).
        """
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        existing = type(self).find(self.state, **self._find_kwargs())
        if existing is not None:
            raise ServiceError(f"{self.service} is already running for {self.state.root} at {existing.address} "
                               f"(pid {existing.pid}): stop it first")
        self.prepare()
        self.state.ensure()
        self._choose_ports()
        cmd = [str(c) for c in self.command()]
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} home-mixer starts: {' '.join(cmd)}\n".encode())
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.environment(), cwd=self.cwd(), start_new_session=True)
        self.pid = proc.pid
        try:
            self.create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            self.create_time = None  # exited already: the loop below reports it
        self._record_started(cmd)
        deadline = started + timeout_s
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise ServiceError(f"{self.service} exited with code {code} while starting; last lines of "
                                       f"{self.log_file}:\n{log_tail(self.log_file)}")
                if self.ready():
                    break
                failure = self.start_failure()
                if failure:
                    raise ServiceError(failure)
                if time.monotonic() > deadline:
                    raise ServiceError(f"{self.service} was not ready within {timeout_s:.0f} s; last lines of "
                                       f"{self.log_file}:\n{log_tail(self.log_file)}")
                time.sleep(0.1)
        except BaseException:  # failure, timeout, Ctrl-C: never leave a process behind
            self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        return self

    def _find_kwargs(self) -> dict[str, Any]:
        """Constructor arguments that select this instance's record (a mixer's ``name``)."""
        return {}

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the process tree (:func:`stop_tree`: SIGTERM, SIGKILL after ``timeout_s``, default
        ``stop_timeout_s``; leftover descendants too) and drop the pid from the record (the ports
        stay recorded). A process that is already gone or not ours (recycled pid) is not signalled.
        """
        if self.pid is not None:
            stop_tree(self.pid, self.stop_timeout_s if timeout_s is None else timeout_s, self.create_time)
        self._forget()

    def kill(self) -> None:
        """SIGKILL the whole process tree at once (:func:`kill_tree`): a crash, for fail-over tests.
        The record stays (a later :meth:`find` sees the process gone)."""
        if self.pid is not None and self.is_ours():
            kill_tree(self.pid)

    def status(self) -> dict[str, Any]:
        """``{"service", "running", "ready", "pid", "address", "ports", "log"}`` plus
        :meth:`status_extra` while running (``running``: the process is alive; ``ready``: it
        passes its readiness probe)."""
        alive = self.is_ours()
        out: dict[str, Any] = {"service": self.record_name, "running": alive, "ready": alive and self.ready(),
                               "pid": self.pid if alive else None, "address": self.address if alive else None,
                               "ports": self.ports, "log": str(self.log_file)}
        if alive:
            out.update(self.status_extra())
        return out


class IndexedInstance:
    """Mixin of a service that runs as several numbered instances (an ``index`` field): each has
    its own record and log, ``<service>-<index>``, and is found by its index."""

    @property
    def record_name(self) -> str:
        return f"{self.service}-{self.index}"  # type: ignore[attr-defined]

    def _find_kwargs(self) -> dict[str, Any]:
        return {"index": self.index}  # type: ignore[attr-defined]


def recorded_member(state: StateDir, cls, index: int):
    """Instance ``index`` of ``cls`` (an :class:`IndexedInstance` service): the running one, else an
    unstarted one with its recorded ports (None where it never ran)."""
    found = cls.find(state, index=index)
    if found is not None:
        return found
    member = cls(state, index=index)
    recorded = member.read_record().get("ports") or {}
    for f in cls.port_fields:
        setattr(member, f, int(recorded[f]) if recorded.get(f) is not None else None)
    return member


def stop_recorded(state: StateDir, timeout_s: float = 15.0) -> list[str]:
    """Stop every service process recorded in ``state.run`` (last started first), whatever its kind.

    Only records written by :meth:`ManagedProcess.start` count, and only processes that are alive
    and started at the recorded time are signalled (a recycled pid is left alone). The records keep
    their ports. Returns the record names of the services stopped.
    """
    records = []
    for path in sorted(state.run.glob("*.json")) if state.run.exists() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and info.get("service") and info.get("pid") is not None \
                and info.get("create_time") is not None:
            records.append((info.get("started_at") or 0.0, path, info))
    stopped = []
    for _, path, info in sorted(records, key=lambda r: r[0], reverse=True):
        if _process(int(info["pid"]), info.get("create_time")) is not None:
            stop_tree(int(info["pid"]), timeout_s, info.get("create_time"))
            stopped.append(path.stem)
        info = {k: v for k, v in info.items() if k in ("service", "ports")}
        path.write_text(json.dumps(info, indent=1) + "\n")
    return stopped


# ---------------------------------------------------------------- Redis


@dataclass
class RedisServer(ManagedProcess):
    """A ``redis-server`` (Debian's package) on a loopback port, data in ``state/redis``.

    The port is chosen once and recorded in ``run/redis.json``; a restart reuses it while it is
    free (clients keep their address). AOF persistence is on (``appendfsync everysec``) so
    acknowledged writes survive a restart.

    Attributes:
        port: TCP port on 127.0.0.1 (None: the recorded one, else a free one, at start).
    """

    port: int | None = None

    service: ClassVar[str] = "redis"
    cmdline_marker: ClassVar[str] = "redis-server"
    # Redis answers LOADING until its AOF is read back: a full demo state (~1.9 GB) takes 20-40 s
    # on 2 cores, so 15 s refused to restart it. A process that dies is still reported at once.
    start_timeout_s: ClassVar[float] = 120.0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``.

        Raises:
            ServiceError: not started or found.
        """
        if self.port is None:
            raise ServiceError("Redis is not started: run `home-mixer services start` first.")
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return self.url

    @property
    def feast_connection_string(self) -> str:
        """Feast's RedisOnlineStoreConfig.connection_string form of ``url``."""
        return feast_connection_string(self.url)

    @property
    def log_file(self) -> Path:
        return self.state.redis / "redis.log"

    def prepare(self) -> None:
        """Raises ServiceError if ``redis-server`` is not installed, or the HA set (``RedisHA``) or
        the cluster (``RedisCluster``) runs for this state folder (one online store per state folder)."""
        if shutil.which("redis-server") is None:
            raise ServiceError(
                "redis-server not found on PATH. Install it with `apt-get install -y redis-server` "
                "(scripts/setup.sh does this) or set HOME_MIXER_REDIS_URL to an existing server."
            )
        _refuse_other_store(self.state, "single")

    def command(self) -> list[str]:
        return [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.state.redis), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                # an expiring idempotency set (an hour of event ids) is freed off the main thread
                "--lazyfree-lazy-expire", "yes",
                "--protected-mode", "yes", "--daemonize", "no"]

    def _ping(self) -> bool:
        try:
            client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def ready(self) -> bool:
        """True when the server answers PING."""
        return self._ping()

    def live(self) -> bool:
        """True when the server answers PING."""
        return self._ping()

    def start(self, timeout_s: float | None = None) -> "RedisServer":
        """Start redis-server and wait until it answers PING (default timeout 15 s).

        Raises:
            ServiceError: the binary is missing (install Debian's ``redis-server``: ``make setup``
                does it), a Redis is already running for this state folder, or the server did not
                answer in time (see ``state/redis/redis.log``).
        """
        return super().start(timeout_s)  # type: ignore[return-value]


# ---------------------------------------------------------------- Redis HA: primary + replica + Sentinels

HA_SERVICE_NAME = "home-mixer"  # the primary's name in `sentinel monitor` and in the sentinel address
HA_NODES = 2  # a primary and one replica
HA_SENTINELS = 3  # a majority (2) survives one Sentinel's loss
HA_QUORUM = 2
# Local failover tuning (one machine, loopback): a Sentinel marks the primary down after 1 s
# without a valid PING reply (Redis's default is 30 s, sized for real networks); 2 s of
# failover-timeout bounds a stuck failover and, doubled, the wait before a retry by another
# Sentinel after a split vote (Redis's default is 3 min). Measured here: writes resume on the
# promoted replica ~2 s after the primary's SIGKILL.
HA_DOWN_AFTER_MS = 1000
HA_FAILOVER_TIMEOUT_MS = 2000


def _redis_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServiceError(f"{name} not found on PATH. Install it with `apt-get install -y {package}` "
                           "(scripts/setup.sh does this).")
    return path


def _client(port: int, timeout_s: float = 1.0) -> redis.Redis:
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host="127.0.0.1", port=int(port), socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                       retry=Retry(NoBackoff(), 0))


def _ask(port: int | None, *command, timeout_s: float = 1.0):
    """One command to 127.0.0.1:``port``; None if it does not answer (or ``port`` is None)."""
    if port is None:
        return None
    client = _client(port, timeout_s)
    try:
        return client.execute_command(*command)
    except redis.RedisError:
        return None
    finally:
        client.close()


@dataclass
class RedisNode(IndexedInstance, ManagedProcess):
    """One Redis node of the HA set (``redis-ha-node-<index>``): Debian's ``redis-server`` with a
    config file generated at each start in ``state/redis/ha/node-<index>.conf`` (Sentinel rewrites
    it with ``CONFIG REWRITE`` when it changes the node's role), data and AOF in
    ``state/redis/ha/node-<index>/``.

    Attributes:
        index: 1..``HA_NODES``.
        port: TCP port on 127.0.0.1 (None: the recorded one, else a free one).
        replica_of: the primary's port when started as a replica (None: start as a primary).
    """

    index: int = 1
    port: int | None = None
    replica_of: int | None = None

    service: ClassVar[str] = "redis-ha-node"
    record_fields: ClassVar[tuple[str, ...]] = ("index", "replica_of")
    cmdline_marker: ClassVar[str] = "redis-server"
    start_timeout_s: ClassVar[float] = 15.0

    @property
    def set_folder(self) -> Path:
        """The folder of the set's configs, logs and data folders."""
        return self.state.redis / "ha"

    @property
    def folder(self) -> Path:
        return self.set_folder / f"node-{self.index}"

    @property
    def config_file(self) -> Path:
        return self.set_folder / f"node-{self.index}.conf"

    @property
    def log_file(self) -> Path:
        return self.set_folder / f"node-{self.index}.log"

    @property
    def address(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def prepare(self) -> None:
        """Raises ServiceError if ``redis-server`` is not installed."""
        _redis_binary("redis-server", "redis-server")

    def config_lines(self) -> list[str]:
        """The node's ``redis.conf`` lines (a subclass adds its own)."""
        lines = [
            f"port {self.port}", "bind 127.0.0.1", "protected-mode yes", "daemonize no",
            f'dir "{self.folder}"', "appendonly yes", "appendfsync everysec", 'save ""',
            # an expiring idempotency set (an hour of event ids) is freed off the main thread
            "lazyfree-lazy-expire yes",
            # a replica (re)syncs at once: Redis 7 waits 5 s by default for more replicas to share
            # a diskless transfer, which would delay the start and the old primary's return
            "repl-diskless-sync yes", "repl-diskless-sync-delay 0",
            "replica-read-only yes", "replica-serve-stale-data yes",
        ]
        if self.replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {self.replica_of}")
        return lines

    def command(self) -> list[str]:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("# generated by home-mixer at each start; Redis may rewrite it\n"
                                    + "\n".join(self.config_lines()) + "\n")
        return [_redis_binary("redis-server", "redis-server"), str(self.config_file)]

    def ready(self) -> bool:
        """True when the node answers PING (a replica: once it has loaded its data)."""
        return _ask(self.port, "PING") is not None

    def live(self) -> bool:
        return self.ready()

    def role(self) -> str | None:
        """``"master"`` or ``"slave"`` as the node reports it (``ROLE``); None if it does not answer."""
        answer = _ask(self.port, "ROLE")
        if not answer:
            return None
        role = answer[0]
        return role.decode() if isinstance(role, bytes) else str(role)

    def status_extra(self) -> dict[str, Any]:
        return {"role": self.role()}


@dataclass
class RedisSentinel(IndexedInstance, ManagedProcess):
    """One Sentinel of the HA set (``redis-ha-sentinel-<index>``): Debian's ``redis-sentinel`` with
    a config generated at each start in ``state/redis/ha/sentinel-<index>.conf`` (Sentinel rewrites
    it as it learns replicas, peers and failovers; the next start reads the last primary from it).

    Attributes:
        index: 1..``HA_SENTINELS``.
        port: TCP port on 127.0.0.1.
        primary_port: the primary to monitor at start.
        down_after_ms, failover_timeout_ms: Sentinel's settings (module constants' docstring).
    """

    index: int = 1
    port: int | None = None
    primary_port: int | None = None
    down_after_ms: int = HA_DOWN_AFTER_MS
    failover_timeout_ms: int = HA_FAILOVER_TIMEOUT_MS

    service: ClassVar[str] = "redis-ha-sentinel"
    record_fields: ClassVar[tuple[str, ...]] = ("index", "primary_port", "down_after_ms", "failover_timeout_ms")
    cmdline_marker: ClassVar[str] = "sentinel"
    start_timeout_s: ClassVar[float] = 15.0

    @property
    def config_file(self) -> Path:
        return self.state.redis / "ha" / f"sentinel-{self.index}.conf"

    @property
    def log_file(self) -> Path:
        return self.state.redis / "ha" / f"sentinel-{self.index}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def prepare(self) -> None:
        """Raises ServiceError if ``redis-sentinel`` is not installed or no primary port is set."""
        _redis_binary("redis-sentinel", "redis-sentinel")
        if self.primary_port is None:
            raise ServiceError("a Sentinel needs the primary's port to monitor (RedisHA.start sets it)")

    def command(self) -> list[str]:
        name = HA_SERVICE_NAME
        lines = [
            f"port {self.port}", "bind 127.0.0.1", "daemonize no", f'dir "{self.config_file.parent}"',
            f"sentinel monitor {name} 127.0.0.1 {self.primary_port} {HA_QUORUM}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text("# generated by home-mixer at each start; Sentinel rewrites it\n"
                                    + "\n".join(lines) + "\n")
        return [_redis_binary("redis-sentinel", "redis-sentinel"), str(self.config_file)]

    def master_state(self) -> dict[str, str] | None:
        """``SENTINEL MASTER <service>`` as a dict of strings (None if the Sentinel does not answer)."""
        answer = _ask(self.port, "SENTINEL", "MASTER", HA_SERVICE_NAME)
        return _pairs(answer) if answer else None

    def replicas(self) -> list[dict[str, str]]:
        """``SENTINEL REPLICAS <service>``: one dict of strings per replica (empty if no answer)."""
        answer = _ask(self.port, "SENTINEL", "REPLICAS", HA_SERVICE_NAME) or []
        return [_pairs(r) for r in answer]

    def primary(self) -> int | None:
        """The port of the primary this Sentinel names now (None if it does not answer)."""
        answer = _ask(self.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", HA_SERVICE_NAME)
        if not answer:
            return None
        return int(answer[1])

    def ready(self) -> bool:
        """True when the Sentinel answers about the monitored primary."""
        return self.master_state() is not None

    def live(self) -> bool:
        return _ask(self.port, "PING") is not None

    def status_extra(self) -> dict[str, Any]:
        m = self.master_state() or {}
        return {"primary": f"{m.get('ip')}:{m.get('port')}" if m else None, "flags": m.get("flags"),
                "replicas": m.get("num-slaves"), "other_sentinels": m.get("num-other-sentinels")}


def _pairs(answer) -> dict[str, str]:
    """A Sentinel reply (flat ``[key, value, ...]`` list, or a dict) as a dict of strings."""
    items = answer.items() if isinstance(answer, dict) else zip(answer[::2], answer[1::2])
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else str(v))
            for k, v in items}


def _last_monitored_port(config: Path) -> tuple[int, int] | None:
    """``(config epoch, primary port)`` from a Sentinel config's ``sentinel config-epoch`` and
    ``sentinel monitor`` lines (Sentinel rewrites both after a failover; epoch 0 when absent), or None."""
    port, epoch = None, 0
    try:
        for line in config.read_text().splitlines():
            parts = line.split()
            if parts[:2] == ["sentinel", "monitor"] and len(parts) >= 5 and parts[2] == HA_SERVICE_NAME:
                port = int(parts[4])
            elif parts[:2] == ["sentinel", "config-epoch"] and len(parts) >= 4 and parts[2] == HA_SERVICE_NAME:
                epoch = int(parts[3])
    except (OSError, ValueError):
        return None
    return None if port is None else (epoch, port)


def _recorded_hosts(members: list[ManagedProcess], label: str, flag: str) -> list[tuple[str, int]]:
    """``("127.0.0.1", port)`` of each member's recorded ``port``.

    Raises:
        ServiceError: a member never started (no port recorded); says to run ``services start <flag>``.
    """
    ports = [getattr(m, "port") for m in members]
    if any(p is None for p in ports):
        raise ServiceError(f"{label} is not started: run `home-mixer services start {flag}` first.")
    return [("127.0.0.1", int(p)) for p in ports]


class RedisSet:
    """What the multi-process online stores (:class:`RedisHA`, :class:`RedisCluster`) share: waiting
    until :meth:`problems` is empty, readiness, and a status over their members.

    A subclass defines ``status_name`` (the status's ``service``), ``not_ready`` (the start of the
    timeout message), :meth:`members`, :meth:`problems`, ``address``, ``pid``, ``log_file`` and
    optionally :meth:`status_fields`.
    """

    status_name: ClassVar[str] = "redis-set"
    not_ready: ClassVar[str] = "the Redis set was not ready in time"

    def members(self) -> list[ManagedProcess]:
        """Every process of the set (running or not)."""
        raise NotImplementedError

    def problems(self) -> list[str]:
        """What keeps the set from being ready now (empty when ready)."""
        raise NotImplementedError

    def status_fields(self, running: bool) -> dict[str, Any]:
        """Set-specific fields of :meth:`status`."""
        return {}

    def _wait_ready(self, deadline: float) -> None:
        """Poll :meth:`problems` every 0.1 s until empty.

        Raises:
            ServiceError: still not ready at ``deadline`` (monotonic s); the message lists the problems.
        """
        while True:
            problems = self.problems()
            if not problems:
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"{self.not_ready}: " + "; ".join(problems) + f" (logs in {self.log_file})")
            time.sleep(0.1)

    def ready(self) -> bool:
        """True when :meth:`problems` finds none."""
        return not self.problems()

    def status(self) -> dict[str, Any]:
        """``{"service", "running", "ready", "pid", "address", "members": [member status], "log"}``
        plus :meth:`status_fields`."""
        members = [m.status() for m in self.members()]
        running = any(m["running"] for m in members)
        try:
            address = self.address
        except ServiceError:
            address = None
        return {"service": self.status_name, "running": running, "ready": running and self.ready(), "pid": self.pid,
                "address": address if running else None, **self.status_fields(running), "members": members,
                "log": str(self.log_file)}


@dataclass
class RedisHA(RedisSet):
    """The HA online store: ``HA_NODES`` Redis nodes (one primary, replicas) and ``HA_SENTINELS``
    Sentinels, each a :class:`ManagedProcess` with its own record and port in ``state/run``
    (``redis-ha-node-<i>``, ``redis-ha-sentinel-<i>``).

    :meth:`start` starts whatever of the set is not running, and keeps the roles the set had: the
    primary is the one the running Sentinels name (the newest config epoch wins), else a running
    node that says it is a primary, else the one the Sentinels' configs name (they are rewritten at
    each failover; again the newest epoch wins), else node 1. Every other node starts as its
    replica, once the running Sentinels agree. A primary killed and started again therefore comes
    back as a replica of the promoted one (it resyncs from it), never as a second primary.

    Clients reach it through :attr:`address` (``redis+sentinel://...``; ``core.online_store``).

    Attributes:
        state: the state folder.
        started_seconds: how long the last :meth:`start` took until the set was ready (s).
    """

    state: StateDir
    started_seconds: float | None = None

    label: ClassVar[str] = "redis (HA: primary + replica + 3 Sentinels)"
    status_name: ClassVar[str] = "redis-ha"
    not_ready: ClassVar[str] = "Redis HA was not ready in time"

    def members(self) -> list[ManagedProcess]:
        return [*self.nodes(), *self.sentinels()]

    def nodes(self) -> list[RedisNode]:
        """Every node: the running instance, else an unstarted one with its recorded port."""
        return [self._member(RedisNode, i) for i in range(1, HA_NODES + 1)]

    def sentinels(self) -> list[RedisSentinel]:
        """Every Sentinel: the running instance, else an unstarted one with its recorded port."""
        return [self._member(RedisSentinel, i) for i in range(1, HA_SENTINELS + 1)]

    def _member(self, cls, index: int):
        return recorded_member(self.state, cls, index)

    @classmethod
    def find(cls, state: StateDir) -> "RedisHA | None":
        """The HA set of ``state`` if any of its processes runs, else None."""
        ha = cls(state)
        return ha if any(m.is_ours() for m in (*ha.nodes(), *ha.sentinels())) else None

    @property
    def pid(self) -> int | None:
        """The primary node's pid (None if not running): the CLI prints it."""
        primary = self.primary_node()
        return primary.pid if primary is not None and primary.is_ours() else None

    @property
    def log_file(self) -> Path:
        return self.state.redis / "ha"

    @property
    def address(self) -> str:
        """``redis+sentinel://127.0.0.1:<p1>,...:<p3>/home-mixer/0``.

        Raises:
            ServiceError: the Sentinels were never started (no ports recorded).
        """
        from core.online_store import sentinel_address

        hosts = _recorded_hosts(self.sentinels(), "Redis HA", "--ha")
        return sentinel_address(hosts, HA_SERVICE_NAME, 0)

    def sentinel_views(self) -> list[tuple[int, int]]:
        """``(config epoch, primary port)`` as each running Sentinel names it now (``SENTINEL
        MASTER``). Right after a failover the Sentinels can disagree for a moment: the leader has
        switched, the others learn the new epoch from its hello messages (Redis Sentinel docs,
        "Configuration propagation")."""
        views = []
        for s in self.sentinels():
            if s.is_ours():
                m = s.master_state()
                if m and m.get("port", "").isdigit():
                    views.append((int(m.get("config-epoch", "0") or 0), int(m["port"])))
        return views

    def primary_port(self) -> int | None:
        """The current primary's port (see the class docstring for the order of the sources);
        among Sentinels that disagree, the one with the newest config epoch wins."""
        views = self.sentinel_views()
        if views:
            return max(views)[1]
        for n in self.nodes():
            if n.is_ours() and n.role() == "master":
                return n.port
        ports = {n.port for n in self.nodes()}
        recorded = [v for s in self.sentinels() if (v := _last_monitored_port(s.config_file)) and v[1] in ports]
        if recorded:
            return max(recorded)[1]
        return self.nodes()[0].port

    def primary_node(self) -> RedisNode | None:
        """The node that is the primary now (None before the first start)."""
        port = self.primary_port()
        return next((n for n in self.nodes() if n.port is not None and n.port == port), None)

    def start(self, timeout_s: float | None = None) -> "RedisHA":
        """Start what is not running and wait until the Sentinels agree on a primary with a
        replica in sync and see each other (so a failover can happen from then on).

        Args:
            timeout_s: seconds to wait for the whole set (default 30).

        Returns:
            self, with ``started_seconds`` set.

        Raises:
            ServiceError: ``redis-server`` or ``redis-sentinel`` is missing, the single-mode Redis
                runs for this state folder (stop it first: one online store per state folder), a
                process failed to start, or the set was not ready in time (the message says what
                was missing). What this call started is stopped again on failure.
        """
        timeout_s = 30.0 if timeout_s is None else timeout_s
        _redis_binary("redis-server", "redis-server")
        _redis_binary("redis-sentinel", "redis-sentinel")
        _refuse_other_store(self.state, "ha")
        t0 = time.monotonic()
        started: list[ManagedProcess] = []
        try:
            nodes = self.nodes()
            if not all(n.is_ours() for n in nodes):
                # a node restarted while the Sentinels still disagree could start as a second
                # primary and be kept as the primary by a Sentinel with the stale config; while a
                # node runs, a primary the Sentinels see down is about to be failed over: wait for it
                self._wait_agreed(t0 + timeout_s, primary_down_too=any(n.is_ours() for n in nodes))
            primary_port = self.primary_port()
            primary = next((n for n in nodes if n.port == primary_port), nodes[0])
            order = [primary, *[n for n in nodes if n is not primary]]
            for node in order:
                if node.is_ours():
                    continue
                node.replica_of = None if node is primary else primary.port
                node.start(timeout_s=max(1.0, timeout_s - (time.monotonic() - t0)))
                started.append(node)
            for s in self.sentinels():
                if s.is_ours():
                    continue
                s.primary_port = primary.port
                s.start(timeout_s=max(1.0, timeout_s - (time.monotonic() - t0)))
                started.append(s)
            self._wait_ready(t0 + timeout_s)
        except BaseException:
            for member in reversed(started):
                member.stop()
            raise
        self.started_seconds = time.monotonic() - t0
        return self

    def _wait_agreed(self, deadline: float, primary_down_too: bool = False) -> None:
        """Wait until the running Sentinels name one primary and none is failing over (with
        ``primary_down_too``, also until none sees that primary down, ``s_down`` / ``o_down``, for
        up to 10 s: the failover that follows names another).

        Raises:
            ServiceError: they still disagree at ``deadline`` (monotonic s).
        """
        # a primary seen down is waited for a failover's time at most (down-after, the vote, the
        # promotion): if none comes (no replica to promote) the node starts as the named primary
        down_until = min(deadline, time.monotonic() + 10.0) if primary_down_too else 0.0
        while True:
            states = [m for s in self.sentinels() if s.is_ours() and (m := s.master_state())]
            ports = {m.get("port") for m in states}
            busy = ("failover", "s_down", "o_down") if time.monotonic() < down_until else ("failover",)
            if len(ports) <= 1 and not any(b in m.get("flags", "") for m in states for b in busy):
                return
            if time.monotonic() > deadline:
                raise ServiceError(f"the Sentinels have not settled a failover: they name the primary ports "
                                   f"{sorted(ports)}; wait a few seconds and start again (logs in {self.log_file})")
            time.sleep(0.1)

    def problems(self) -> list[str]:
        """What keeps the set from failing over now (empty when ready)."""
        problems = []
        named = set()
        for s in self.sentinels():
            m = s.master_state()
            if m is None:
                problems.append(f"sentinel {s.index} does not answer")
                continue
            named.add(m.get("port"))
            flags = m.get("flags", "")
            if "s_down" in flags or "o_down" in flags or "failover" in flags:
                problems.append(f"sentinel {s.index}: primary flags {flags}")
            if int(m.get("num-slaves", 0)) < HA_NODES - 1:
                problems.append(f"sentinel {s.index} knows {m.get('num-slaves')} replica(s)")
            if int(m.get("num-other-sentinels", 0)) < HA_SENTINELS - 1:
                problems.append(f"sentinel {s.index} knows {m.get('num-other-sentinels')} other Sentinel(s)")
            for replica in s.replicas():
                if {"s_down", "o_down", "disconnected"} & set(replica.get("flags", "").split(",")):
                    problems.append(f"sentinel {s.index}: replica {replica.get('name')} is {replica.get('flags')}")
        if len(named) > 1:
            problems.append(f"the Sentinels name different primaries (ports {sorted(named)})")
        primary = self.primary_port()
        for n in self.nodes():
            if n.port == primary:
                continue
            info = _ask(n.port, "INFO", "replication") or {}
            if info.get("master_link_status") != "up":
                problems.append(f"node {n.index} is not in sync with the primary "
                                f"(master_link_status {info.get('master_link_status')})")
        return problems

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the Sentinels first (so none fails over while the nodes stop), then the replicas,
        then the primary; the records keep their ports, the Sentinels' configs the last primary."""
        for s in self.sentinels():
            s.stop(timeout_s)
        primary_port = self.primary_port()
        for n in sorted(self.nodes(), key=lambda n: n.port == primary_port):
            n.stop(timeout_s)

    def status_fields(self, running: bool) -> dict[str, Any]:
        """``primary``: ``127.0.0.1:<port>`` of the current primary (None when stopped)."""
        return {"primary": f"127.0.0.1:{self.primary_port()}" if running else None}


# ---------------------------------------------------------------- Redis Cluster: primaries + replicas

CLUSTER_MIN_SHARDS = 3  # redis-cli --cluster create refuses fewer primaries
# A node is marked failing after 2 s without an answer (Redis's default is 15 s, sized for real
# networks); its replica is then promoted (Redis Cluster spec, "Failure detection").
CLUSTER_NODE_TIMEOUT_MS = 2000
CLUSTER_SLOTS = 16384


@dataclass
class RedisClusterNode(RedisNode):
    """One node of the local Redis Cluster (``redis-cluster-node-<index>``): a :class:`RedisNode`
    with ``cluster-enabled yes``; config, log and data in ``<state>/redis-cluster/``. The node's
    ``nodes.conf`` (its id, epoch, role and slots, rewritten by Redis) lives in its data folder and
    is kept across restarts, so a restarted node rejoins with the role and slots it had.

    Attributes:
        index: 1..2 x shards.
        port: TCP port on 127.0.0.1 (None: the recorded one, else a free one).
        bus_port: the cluster bus's port (``cluster-port``; chosen and recorded like ``port``:
            Redis's default, ``port + 10000``, may be taken or above 65535 for an OS-chosen port).
    """

    bus_port: int | None = None

    service: ClassVar[str] = "redis-cluster-node"
    port_fields: ClassVar[tuple[str, ...]] = ("port", "bus_port")
    record_fields: ClassVar[tuple[str, ...]] = ("index",)

    @property
    def set_folder(self) -> Path:
        return self.state.root / "redis-cluster"

    def config_lines(self) -> list[str]:
        return [*super().config_lines(), "cluster-enabled yes", "cluster-config-file nodes.conf",
                f"cluster-port {self.bus_port}",
                f"cluster-node-timeout {CLUSTER_NODE_TIMEOUT_MS}"]

    def cluster_info(self) -> dict[str, str]:
        """``CLUSTER INFO`` as a dict of strings (empty if the node does not answer)."""
        answer = _ask(self.port, "CLUSTER", "INFO")
        if isinstance(answer, bytes):
            answer = answer.decode()
        if isinstance(answer, str):
            return dict(line.split(":", 1) for line in answer.splitlines() if ":" in line)
        return {str(k): str(v) for k, v in (answer or {}).items()}

    def status_extra(self) -> dict[str, Any]:
        info = self.cluster_info()
        return {"role": self.role(), "cluster_state": info.get("cluster_state")}


def _cluster_node_indexes(state: StateDir) -> list[int]:
    """Indexes of the cluster nodes recorded in ``state.run`` (sorted)."""
    prefix = f"{RedisClusterNode.service}-"
    found = []
    for path in state.run.glob(f"{prefix}*.json") if state.run.exists() else []:
        tail = path.stem[len(prefix):]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(found)


@dataclass
class RedisCluster(RedisSet):
    """A local Redis Cluster: ``shards`` primaries and one replica each, every node a
    :class:`RedisClusterNode` with its own record and port in ``state/run``.

    The first :meth:`start` starts the nodes and joins them with ``redis-cli --cluster create ...
    --cluster-replicas 1 --cluster-yes`` (16384 slots split evenly over the primaries, each
    replica on another primary: Redis Cluster tutorial); a later start only starts the nodes, which
    rejoin from their ``nodes.conf`` with their roles and slots. Clients reach it through
    :attr:`address` (``redis+cluster://...``; ``core.online_store``).

    Attributes:
        state: the state folder.
        shards: primaries (None: as many as the recorded nodes make, else ``CLUSTER_MIN_SHARDS``).
        started_seconds: how long the last :meth:`start` took until ``cluster_state:ok`` (s).
    """

    state: StateDir
    shards: int | None = None
    started_seconds: float | None = None

    label: ClassVar[str] = "redis cluster (primaries + one replica each)"
    status_name: ClassVar[str] = "redis-cluster"
    not_ready: ClassVar[str] = "Redis Cluster was not ok in time"

    def __post_init__(self):
        recorded = _cluster_node_indexes(self.state)
        if self.shards is None:
            self.shards = max(len(recorded) // 2, CLUSTER_MIN_SHARDS)
        if int(self.shards) < CLUSTER_MIN_SHARDS:
            raise ServiceError(f"a Redis Cluster needs at least {CLUSTER_MIN_SHARDS} primaries, got "
                               f"--cluster {self.shards}")
        if recorded and len(recorded) != 2 * self.shards:
            raise ServiceError(f"{self.state.root} holds a cluster of {len(recorded) // 2} primaries, not "
                               f"{self.shards}: start it with --cluster {len(recorded) // 2}, or run "
                               "`home-mixer clean` to start over")

    def nodes(self) -> list[RedisClusterNode]:
        """Every node: the running instance, else an unstarted one with its recorded port."""
        return [recorded_member(self.state, RedisClusterNode, i) for i in range(1, 2 * self.shards + 1)]

    @classmethod
    def find(cls, state: StateDir) -> "RedisCluster | None":
        """The cluster of ``state`` if any of its nodes runs, else None."""
        if not _cluster_node_indexes(state):
            return None
        cluster = cls(state)
        return cluster if any(n.is_ours() for n in cluster.nodes()) else None

    @property
    def pid(self) -> int | None:
        """The first running node's pid (None if none runs): the CLI prints it."""
        return next((n.pid for n in self.nodes() if n.is_ours()), None)

    @property
    def log_file(self) -> Path:
        return self.state.root / "redis-cluster"

    @property
    def address(self) -> str:
        """``redis+cluster://127.0.0.1:<p1>,...`` (every node: a client can start from any).

        Raises:
            ServiceError: the nodes were never started (no ports recorded).
        """
        from core.online_store import cluster_address

        return cluster_address(_recorded_hosts(self.nodes(), "Redis Cluster", f"--cluster {self.shards}"))

    def start(self, timeout_s: float | None = None) -> "RedisCluster":
        """Start what is not running, create the cluster if its nodes never joined, and wait until
        every node says ``cluster_state:ok`` and knows every other node.

        Args:
            timeout_s: seconds to wait for the whole cluster (default 60).

        Returns:
            self, with ``started_seconds`` set.

        Raises:
            ServiceError: ``redis-server`` or ``redis-cli`` is missing, another online store (the
                single Redis or the HA set) runs for this state folder, a node failed to start,
                ``redis-cli --cluster create`` failed, some nodes joined and others not (run
                ``home-mixer clean``), or the cluster was not ok in time. What this call started is
                stopped again on failure.
        """
        timeout_s = 60.0 if timeout_s is None else timeout_s
        _redis_binary("redis-server", "redis-server")
        cli = _redis_binary("redis-cli", "redis-tools")
        _refuse_other_store(self.state, "cluster")
        t0 = time.monotonic()
        started: list[ManagedProcess] = []
        try:
            nodes = self.nodes()
            for node in nodes:
                if not node.is_ours():
                    node.start(timeout_s=max(1.0, timeout_s - (time.monotonic() - t0)))
                    started.append(node)
            infos = [n.cluster_info() for n in nodes]
            assigned = [int(i.get("cluster_slots_assigned", 0)) for i in infos]
            if not any(assigned):
                self._create(cli, nodes, max(1.0, timeout_s - (time.monotonic() - t0)))
            elif int(max(int(i.get("cluster_known_nodes", 0)) for i in infos)) < len(nodes):
                raise ServiceError(f"the nodes in {self.log_file} joined another cluster or only part of this "
                                   "one: run `home-mixer clean` (or remove that folder) to start over")
            self._wait_ready(t0 + timeout_s)
        except BaseException:
            for member in reversed(started):
                member.stop()
            raise
        self.started_seconds = time.monotonic() - t0
        return self

    def _create(self, cli: str, nodes: list[RedisClusterNode], timeout_s: float) -> None:
        cmd = [cli, "--cluster", "create", *[f"127.0.0.1:{n.port}" for n in nodes], "--cluster-replicas", "1",
               "--cluster-yes"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ServiceError(f"`{' '.join(cmd)}` did not finish within {timeout_s:.0f} s") from None
        if done.returncode != 0 or "[OK] All 16384 slots covered" not in done.stdout:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
            raise ServiceError(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{tail}")

    def members(self) -> list[ManagedProcess]:
        return list(self.nodes())

    def problems(self) -> list[str]:
        """What keeps the cluster from serving every slot now (empty when ok)."""
        problems = []
        nodes = self.nodes()
        for n in nodes:
            info = n.cluster_info()
            if not info:
                problems.append(f"node {n.index} does not answer")
                continue
            if info.get("cluster_state") != "ok":
                problems.append(f"node {n.index}: cluster_state {info.get('cluster_state')}")
            if int(info.get("cluster_known_nodes", 0)) != len(nodes):
                problems.append(f"node {n.index} knows {info.get('cluster_known_nodes')} of {len(nodes)} nodes")
            if int(info.get("cluster_slots_ok", 0)) != CLUSTER_SLOTS:
                problems.append(f"node {n.index} sees {info.get('cluster_slots_ok')} slots ok")
        return problems

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop the replicas, then the primaries (so none is failed over while the others stop);
        records keep their ports, ``nodes.conf`` the roles and slots."""
        for n in sorted(self.nodes(), key=lambda n: n.role() == "master"):
            n.stop(timeout_s)

    def status_fields(self, running: bool) -> dict[str, Any]:
        """``shards``: the number of primaries."""
        return {"shards": self.shards}


def _refuse_other_store(state: StateDir, mode: str) -> None:
    """Raise ServiceError if an online store of another mode than ``mode`` (``single``, ``ha``,
    ``cluster``) runs for ``state``: one online store per state folder."""
    kinds = {"single": ("the single Redis", RedisServer), "ha": ("Redis HA", RedisHA),
             "cluster": ("Redis Cluster", RedisCluster)}
    for other, (label, cls) in kinds.items():
        found = cls.find(state) if other != mode else None
        if found is not None:
            raise ServiceError(f"{label} runs for {state.root} ({found.address}, pid {found.pid}): stop it first "
                               "(`home-mixer services stop`); one online store per state folder")


def online_store_address(state: StateDir) -> str | None:
    """The address of the online store running for ``state``: the HA set's Sentinel address when
    its Sentinels run, else the cluster's address when a node of it runs, else the single Redis's
    URL, else None (``core.online_store`` opens either)."""
    ha = RedisHA(state)
    if any(s.is_ours() for s in ha.sentinels()):
        return ha.address
    cluster = RedisCluster.find(state)
    if cluster is not None:
        return cluster.address
    single = RedisServer.running(state)
    return single.url if single is not None else None
