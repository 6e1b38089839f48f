"""N mixer replicas behind HAProxy: ``home-mixer serve mixer --replicas N``.

``MixerFrontDoor(state, replicas=N).start()``:

1. loads the mixer config (``--config`` over the embedded one): its ``front_door`` section
   configures HAProxy, and the per-replica ``maxconn`` is checked against ``overload.max_in_flight``
   (``mixer.config`` refuses a config where HAProxy could send a replica more than it admits);
2. starts N ``mixer.server.MixerServer`` processes of one worker each, side by side (each loads its
   models), on loopback ports recorded in ``run/<name>-replica-<i>.json`` (so a restart keeps them,
   and Prometheus scrapes every replica as a ``mixer`` target);
3. starts ``mixer.haproxy.HAProxyServer`` in front of them (record ``run/<name>-front-door.json``,
   config ``<state>/haproxy/<name>-front-door.cfg``) on the front port, and waits until a replica has
   passed its health check.

If any step fails, what was started is stopped and ``ServiceError`` says why. :meth:`stop` stops
HAProxy first (no request goes to a stopping replica), then the replicas. :meth:`find` rebuilds a
front door from the records in another process (the CLI's ``stop`` and ``status``);
``home-mixer clean`` stops every recorded process, these included.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.services import ServiceError, free_port
from core.state import StateDir
from mixer.haproxy import Backend, HAProxyServer, require_haproxy
from mixer.server import MixerServer

REPLICA_HOST = "127.0.0.1"  # replicas listen on loopback only: callers go through the front door


def front_door_record(name: str) -> str:
    """The HAProxy record name of front door ``name`` (``<name>-front-door``)."""
    return f"{name}-front-door"


def replica_record(name: str, index: int) -> str:
    """The record name of replica ``index`` (1-based) of front door ``name`` (``<name>-replica-<i>``)."""
    return f"{name}-replica-{index}"


@dataclass
class MixerFrontDoor:
    """HAProxy in front of ``replicas`` mixer processes of one state folder (module docstring).

    Attributes:
        state: the state folder (records in ``run/``).
        replicas: mixer processes behind the front door (>= 1).
        name: prefix of the records (``<name>-front-door``, ``<name>-replica-<i>``).
        host: address the front door listens on (replicas always listen on 127.0.0.1).
        port: the front door's port (None: the recorded one if free, else a free one).
        config: mixer YAML merged over the embedded one, for the replicas and the front door.
        redis_url: ``HOME_MIXER_REDIS_URL`` of the replicas (None: inherited / the config's).
        tracking_uri: ``MLFLOW_TRACKING_URI`` of the replicas (None: the state folder's MLflow).
        haproxy: the HAProxy process once started or found.
        servers: the replica processes once started or found (a dead one is left out by :meth:`find`).
    """

    state: StateDir
    replicas: int = 2
    name: str = "mixer"
    host: str = "127.0.0.1"
    port: int | None = None
    config: Path | None = None
    redis_url: str | None = None
    tracking_uri: str | None = None
    haproxy: HAProxyServer | None = None
    servers: list[MixerServer] = field(default_factory=list)

    def __post_init__(self):
        self.config = Path(self.config) if self.config else None
        if self.replicas < 1:
            raise ValueError(f"a front door needs at least one replica, got {self.replicas}")

    # ------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` of the front door (what callers use).

        Raises:
            ServiceError: not started or found.
        """
        if self.haproxy is None:
            raise ServiceError(f"the front door {self.name!r} is not started: run "
                               "`home-mixer serve mixer start --replicas N` first")
        return self.haproxy.url

    @property
    def metrics_url(self) -> str:
        """HAProxy's Prometheus exporter (``<stats>/metrics``).

        Raises:
            ServiceError: not started or found.
        """
        if self.haproxy is None:
            raise ServiceError(f"the front door {self.name!r} is not started")
        return f"{self.haproxy.stats_url}/metrics"

    @property
    def auth_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}`` for requests through the front door
        (``mixer.auth.client_token``)."""
        from mixer.auth import client_token

        return {"Authorization": f"Bearer {client_token(self.state)}"}

    # ------------------------------------------------------------ lifecycle

    def _replica(self, index: int) -> MixerServer:
        return MixerServer(self.state, name=replica_record(self.name, index), host=REPLICA_HOST, config=self.config,
                           redis_url=self.redis_url, tracking_uri=self.tracking_uri, workers=1)

    def start(self, timeout_s: float | None = None) -> "MixerFrontDoor":
        """Start the replicas side by side, then HAProxy in front of them (module docstring).

        Args:
            timeout_s: seconds each process gets to become ready (default: each service's own;
                a replica loads its models, 120 s).

        Returns:
            self, with ``haproxy`` and ``servers`` set.

        Raises:
            mixer.config.ConfigError: the config is invalid (``front_door`` and ``overload``
                included).
            ServiceError: haproxy is not installed, this front door already runs for the state
                folder, or a replica or HAProxy failed to start (the messages have the end of each
                failed log). Nothing is left running.
        """
        from mixer.config import load_config

        if type(self).find(self.state, name=self.name) is not None:
            raise ServiceError(f"the mixer front door {self.name!r} is already running for {self.state.root}: "
                               "stop it first (`home-mixer serve mixer stop`)")
        settings = load_config(self.config)  # fail on a bad config before anything starts
        maxconn = settings.front_door.maxconn(settings.overload.max_in_flight, settings.overload.max_concurrent)
        require_haproxy()
        self.state.ensure()
        servers = [self._replica(i) for i in range(1, self.replicas + 1)]
        taken: set[int] = set()
        for srv in servers:  # one at a time: replicas started together must not pick the same free port
            srv._choose_ports()
            while srv.port in taken:
                srv.port = free_port()
            taken.add(int(srv.port))
        failures: list[str] = []
        with ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="hm-replica-start") as pool:
            for srv, future in [(s, pool.submit(s.start, timeout_s)) for s in servers]:
                try:
                    future.result()
                except Exception as e:  # noqa: BLE001 - each failure is reported, all are stopped
                    failures.append(f"{srv.name}: {e}")
        if failures:
            self._stop_servers(servers)
            raise ServiceError("mixer replicas failed to start:\n" + "\n".join(failures))
        self.servers = servers
        haproxy = HAProxyServer(self.state, name=front_door_record(self.name), host=self.host, port=self.port,
                                backends=tuple(Backend(s.name, REPLICA_HOST, int(s.port)) for s in servers),
                                settings=settings.front_door, maxconn=maxconn)
        try:
            haproxy.start(timeout_s)
        except BaseException:
            self._stop_servers(servers)
            self.servers = []
            raise
        self.haproxy, self.port = haproxy, haproxy.port
        return self

    @staticmethod
    def _stop_servers(servers: list[MixerServer]) -> None:
        """Stop replicas side by side (each gets SIGTERM and its grace period)."""
        live = [s for s in servers if s.pid is not None]
        if live:
            with ThreadPoolExecutor(max_workers=len(live), thread_name_prefix="hm-replica-stop") as pool:
                list(pool.map(lambda s: s.stop(), live))

    def stop(self) -> None:
        """Stop HAProxy, then the replicas (process trees; records keep their ports)."""
        if self.haproxy is not None:
            self.haproxy.stop()
        self._stop_servers(self.servers)

    def kill_replica(self, index: int) -> MixerServer:
        """SIGKILL replica ``index`` (0-based in ``servers``) and its process tree at once: a crash,
        for fail-over tests and benches. Returns the killed server (its record stays).

        Raises:
            IndexError: no such replica.
        """
        srv = self.servers[index]
        srv.kill()
        return srv

    # ------------------------------------------------------------ discovery

    @classmethod
    def find(cls, state: StateDir, name: str = "mixer") -> "MixerFrontDoor | None":
        """The front door ``name`` recorded in ``state`` if its HAProxy or any of its replicas is
        alive (a half-dead front door is still found, so ``stop`` can finish it); else None."""
        probe = HAProxyServer(state, name=front_door_record(name))
        info = probe.read_record()
        backends = (info.get("fields") or {}).get("backends") or []
        if not backends:
            return None
        haproxy = HAProxyServer.find(state, name=front_door_record(name))
        servers = [s for s in (MixerServer.find(state, name=str(b[0])) for b in backends) if s is not None]
        if haproxy is None and not servers:
            return None
        ports = info.get("ports") or {}
        door = cls(state, replicas=len(backends), name=name,
                   host=(info.get("fields") or {}).get("host") or "127.0.0.1", port=ports.get("port"))
        door.haproxy, door.servers = haproxy, servers  # type: ignore[assignment]
        return door

    def status(self) -> dict[str, Any]:
        """``{"service", "running", "url", "metrics", "config", "replicas": [...]}``: ``running`` is
        HAProxy being alive; each replica has its record name, pid, port and HAProxy's view of it
        (``status`` UP / DOWN / ..., last ``check``), or ``"running": False`` when its process is gone."""
        alive = self.haproxy is not None and self.haproxy.is_ours()
        seen: dict[str, dict] = {}
        if alive:
            try:
                seen = {s["name"]: s for s in self.haproxy.servers()}  # type: ignore[union-attr]
            except ServiceError:
                seen = {}
        by_name = {s.name: s for s in self.servers}
        replicas = []
        for i in range(1, self.replicas + 1):
            rec = replica_record(self.name, i)
            srv = by_name.get(rec)
            row: dict[str, Any] = {"name": rec, "running": srv is not None and srv.is_ours()}
            if srv is not None:
                row.update(pid=srv.pid, url=srv.url)
            if rec in seen:
                row.update(haproxy=seen[rec]["status"], check=seen[rec]["check"])
            replicas.append(row)
        out: dict[str, Any] = {"service": front_door_record(self.name), "running": alive, "replicas": replicas}
        if alive:
            out.update(url=self.haproxy.url, pid=self.haproxy.pid, metrics=self.metrics_url,  # type: ignore[union-attr]
                       stats=f"{self.haproxy.stats_url}/stats", config=str(self.haproxy.config_file),  # type: ignore[union-attr]
                       log=str(self.haproxy.log_file))  # type: ignore[union-attr]
        return out
