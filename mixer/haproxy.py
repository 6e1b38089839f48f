"""HAProxy (Debian's ``haproxy`` 2.6) as the mixer's front door: its settings, the generated config, the process.

Mixer replicas are CPU-bound processes that each run ``overload.max_concurrent`` requests at once
and refuse past ``overload.max_in_flight`` (``mixer.admission``). Balanced by the kernel
(SO_REUSEPORT, uvicorn's workers), a connection lands on a worker whatever that worker holds, so a
caller's pool of 8 connections on 2 workers was mostly instant 503s. HAProxy sends each replica at
most ``maxconn_per_replica`` requests (at or below the mixer's bound) and keeps the rest in one
queue for the whole backend, taken in order by whichever replica frees first: a short burst waits
a few service times instead of being refused, and a replica that fails its health check or dies
leaves the pool while the others take its traffic.

What the generated config does, each setting from the HAProxy 2.6 Configuration Manual
(``/usr/share/doc/haproxy/configuration.txt.gz``, https://docs.haproxy.org/2.6/configuration.html;
section numbers below are that manual's):

- **queue**: ``maxconn`` per server (5.2: "in HTTP mode this parameter limits the number of
  concurrent requests"); requests past it wait in the backend's queue for at most ``timeout queue``
  (4.2), then get 503. The queue is bounded: past ``max_queue`` waiting requests (the ``queue()``
  sample fetch, 7.3.2) a request is answered 503 with ``Retry-After`` at once
  (``http-request return``, 4.2), like the mixer's own refusal.
- **health**: ``option httpchk GET /healthz`` with ``http-check expect status 200`` (4.2); the
  mixer's ``/healthz`` answers 503 when it has nothing to serve (Redis down and its caches cold),
  so such a replica leaves the pool after ``fall`` failed checks and returns after ``rise`` good
  ones; ``inter``/``fastinter``/``downinter`` pace the checks (5.2). ``observe layer4`` with
  ``error-limit``/``on-error mark-down`` (5.2) takes a replica out at its first refused
  connection, without waiting for the next check.
- **retries**: ``retries`` with ``retry-on conn-failure empty-response`` (4.2): a request whose
  connection failed, or whose replica closed or reset the connection without answering (a crash
  mid-request), is sent again; ``option redispatch 1`` (4.2) sends every retry to another replica;
  ``option http-buffer-request`` (4.2) holds the whole request first, which a retry needs. HAProxy
  2.6 retries a reset only for the first request of a client connection: a later one is closed
  without an answer or a log line, for the client to retry (``http-reuse`` in 4.2; maintainers in
  haproxy/haproxy issues #1423 and #3414); measured here, a keep-alive caller lost one request in
  25-50 % of replica kills. So the callers' connections end in a **retry tier** that sends each
  request to the **replica tier** on a connection of its own (``option http-server-close`` over an
  abstract Unix socket, ``abns@``, 11.1) and retries what still comes back 502. Replaying a
  home-timeline request is safe: it reads, and its side effects (served-posts record, impression
  log) are those of a page the caller never got.
- **queue time**: each request gets ``X-Request-Start: t=<µs since the epoch>`` as it arrives
  (``http-request set-header``, 4.2, with the ``date(0,us)`` fetch, 7.3.2), so a replica's quality
  factor sees the wait in HAProxy's queue too (``mixer.admission.upstream_wait_s``).
- **errors**: HAProxy's own 502/503/504 answers (``http-error``, 4.2) are JSON ``{"message": ...}``
  like the mixer's, with ``Retry-After`` on 503.
- **metrics**: a stats frontend on its own port serves HAProxy's Prometheus exporter at
  ``/metrics`` (``http-request use-service prometheus-exporter``, 4.2; built in Debian's package)
  and the stats page at ``/stats`` (``/stats;csv`` is the CSV of the Management Guide, 9.1).
- **logs**: to stdout (the service log), only requests with an error, a retry, a redispatch or a
  5xx (``option dontlog-normal``, 4.2), and every health-check state change
  (``option log-health-checks``).

:class:`HAProxyServer` runs ``haproxy -db -f <state>/haproxy/<name>.cfg`` as a
``core.services.ManagedProcess`` (own session, ports recorded in ``run/<name>.json``, stopped by
``home-mixer clean``); ``mixer.front_door.MixerFrontDoor`` starts it in front of mixer replicas.
"""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.services import ManagedProcess, ServiceError

BACKEND = "mixers"  # the replicas' backend: its name in the config, the stats and the exporter's labels
RETRY_TIER = "retry"  # the backend in front of it that retries what the replica tier answered 502

# retry-on keywords HAProxy 2.6 accepts (configuration manual 4.2, "retry-on")
RETRY_ON_KEYWORDS = frozenset({"none", "conn-failure", "empty-response", "junk-response", "response-timeout",
                               "0rtt-rejected", "all-retryable-errors",
                               "401", "403", "404", "408", "425", "500", "501", "502", "503", "504"})


class HealthCheckSettings(BaseModel):
    """``front_door.health``: HAProxy's HTTP health check of each replica (manual 4.2 ``option
    httpchk``, 5.2 ``inter``/``fall``/``rise``/``observe``).

    Attributes:
        path: the checked path; a replica is in the pool while it answers 200 there.
        interval_ms: between checks of a replica that is up (``inter``).
        fast_interval_ms: between checks while a replica changes state (``fastinter``).
        down_interval_ms: between checks of a replica that is down (``downinter``).
        timeout_ms: a check not answered within this fails (``timeout check``); generous, since a
            replica busy ranking answers its health check between requests.
        fall: consecutive failed checks that take a replica out.
        rise: consecutive good checks that bring it back.
        error_limit: consecutive refused connections of real traffic that take a replica out at
            once (``observe layer4``, ``error-limit``, ``on-error mark-down``); 0 turns it off.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field("/healthz", pattern=r"^/\S*$")
    interval_ms: int = Field(1000, ge=10)
    fast_interval_ms: int = Field(250, ge=10)
    down_interval_ms: int = Field(1000, ge=10)
    timeout_ms: int = Field(2000, ge=10)
    fall: int = Field(2, ge=1)
    rise: int = Field(2, ge=1)
    error_limit: int = Field(1, ge=0)


class FrontDoorSettings(BaseModel):
    """The ``front_door`` section of the mixer config: HAProxy in front of mixer replicas
    (``home-mixer serve mixer --replicas N``). Times in milliseconds.

    Attributes:
        balance: how a free replica is picked (manual 4.2 ``balance``): ``leastconn`` (the one with
            the fewest requests, queued ones included) or ``roundrobin``.
        maxconn_per_replica: requests HAProxy sends one replica at once; the rest wait in HAProxy's
            queue. None: the mixer's ``overload.max_concurrent`` (every request waits in the one
            queue, taken by the first replica to free up). Must not exceed
            ``overload.max_in_flight``, or the mixer would refuse what HAProxy sends.
        max_queue: requests waiting in HAProxy at most; past it a request is answered 503 with
            ``Retry-After: retry_after_s`` at once.
        queue_timeout_ms: longest wait in the queue (``timeout queue``), then 503.
        connect_timeout_ms: to connect to a replica (``timeout connect``; loopback). It is also the
            pause before a retry (4.2 ``retries``: min(timeout connect, 1 s)), so short.
        server_timeout_ms: a replica's inactivity while answering (``timeout server``).
        client_timeout_ms: a caller's inactivity (``timeout client``, ``timeout http-keep-alive``
            is the same).
        retries: attempts after the first on a failure ``retry_on`` names (``retries``).
        retry_on: failures that are retried (``retry-on``; HAProxy 2.6 keywords).
        redispatch_every: send every Nth retry to another replica (``option redispatch N``; 1:
            every retry, 0: never).
        max_connections: connections the front door holds at once (global and frontend ``maxconn``).
        retry_after_s: ``Retry-After`` of the front door's own 503 answers.
        health: the health check.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    balance: Literal["leastconn", "roundrobin"] = "leastconn"
    maxconn_per_replica: int | None = Field(None, ge=1)
    max_queue: int = Field(64, ge=1)
    queue_timeout_ms: int = Field(1000, ge=1)
    connect_timeout_ms: int = Field(100, ge=1)
    server_timeout_ms: int = Field(10_000, ge=1)
    client_timeout_ms: int = Field(30_000, ge=1)
    retries: int = Field(3, ge=0)
    retry_on: tuple[str, ...] = ("conn-failure", "empty-response")
    redispatch_every: int = Field(1, ge=0)
    max_connections: int = Field(2000, ge=1)
    retry_after_s: int = Field(1, ge=0)
    health: HealthCheckSettings = HealthCheckSettings()

    @field_validator("retry_on")
    @classmethod
    def _known_keywords(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [k for k in value if k not in RETRY_ON_KEYWORDS]
        if unknown:
            raise ValueError(f"unknown retry-on keyword(s) {unknown}: HAProxy 2.6 accepts {sorted(RETRY_ON_KEYWORDS)}")
        if not value:
            raise ValueError("give at least one keyword ('none' retries nothing)")
        return value

    def maxconn(self, max_in_flight: int, max_concurrent: int) -> int:
        """Requests one replica gets at once: ``maxconn_per_replica``, else ``max_concurrent``
        (capped at a non-zero ``max_in_flight``).

        Args:
            max_in_flight: the mixer's ``overload.max_in_flight`` (0: no bound).
            max_concurrent: the mixer's ``overload.max_concurrent``.

        Raises:
            ValueError: ``maxconn_per_replica`` exceeds a non-zero ``max_in_flight``.
        """
        if self.maxconn_per_replica is None:
            return min(max_concurrent, max_in_flight) if max_in_flight else max_concurrent
        n = self.maxconn_per_replica
        if max_in_flight and n > max_in_flight:
            raise ValueError(f"front_door.maxconn_per_replica is {n}, above overload.max_in_flight "
                             f"({max_in_flight}): each replica would refuse what HAProxy sends it; keep it "
                             "at or below the bound (HAProxy queues the rest)")
        return n


@dataclass(frozen=True)
class Backend:
    """One replica in the config: ``server <name> <host>:<port>``."""

    name: str
    host: str
    port: int


def _json_message(text: str) -> str:
    """A ``{"message": ...}`` body as one single-quoted HAProxy config word (no quote inside)."""
    if "'" in text or '"' in text or "\\" in text:
        raise ValueError(f"message must not hold quotes or backslashes: {text!r}")
    return "'{\"message\": \"" + text + "\"}'"


def render_config(settings: FrontDoorSettings, backends: list[Backend], *, bind_host: str, port: int,
                  stats_port: int, maxconn: int) -> str:
    """The ``haproxy.cfg`` text of a front door (see the module docstring for each setting).

    Args:
        settings: the ``front_door`` settings.
        backends: the replicas, at least one.
        bind_host: address the front door and its stats listen on.
        port: the front door's port (callers' requests).
        stats_port: the Prometheus exporter (``/metrics``) and stats page (``/stats``).
        maxconn: requests per replica at once (:meth:`FrontDoorSettings.maxconn`).

    Raises:
        ValueError: no backend, or two with one name.
    """
    if not backends:
        raise ValueError("a front door needs at least one replica")
    if len({b.name for b in backends}) != len(backends):
        raise ValueError(f"replica names must be distinct: {[b.name for b in backends]}")
    s, h = settings, settings.health
    # the tiers talk over an abstract Unix socket (Linux; no port, no file), unique per front port
    inner_socket = f"abns@home-mixer-front-door-{port}"
    retry_after = f"hdr Retry-After {s.retry_after_s}"
    observe = (f" observe layer4 error-limit {h.error_limit} on-error mark-down" if h.error_limit else "")
    lines = [
        "# generated by home-mixer (mixer/haproxy.py) at each start: edit the front_door settings, not this file",
        "global",
        # each request holds two connections in HAProxy: caller -> retry tier -> replica tier
        f"  maxconn {2 * s.max_connections + 100}",
        "  nbthread 1  # hundreds of requests/s at most: one thread leaves the cores to the replicas",
        "  log stdout format raw local0 info",
        "",
        "defaults",
        "  mode http",
        "  log global",
        "  option httplog",
        "  option dontlog-normal  # log only errors, retries, redispatches and 5xx",
        "  option log-health-checks",
        # the whole request (a small JSON body) before it is sent on: only a request held whole can
        # be sent again (retry-on); a body still arriving when the headers went out cannot
        "  option http-buffer-request",
        f"  timeout connect {s.connect_timeout_ms}ms",
        f"  timeout client {s.client_timeout_ms}ms",
        f"  timeout http-request {s.client_timeout_ms}ms",
        f"  timeout http-keep-alive {s.client_timeout_ms}ms",
        f"  timeout server {s.server_timeout_ms}ms",
        f"  timeout queue {s.queue_timeout_ms}ms",
        f"  timeout check {h.timeout_ms}ms",
        f"  http-error status 502 content-type application/json string "
        f"{_json_message('a mixer replica gave no answer or an invalid one')}",
        f"  http-error status 503 content-type application/json string "
        f"{_json_message('no mixer replica could take the request in time: retry later')} {retry_after}",
        f"  http-error status 504 content-type application/json string "
        f"{_json_message('the mixer replica did not answer in time')}",
        "",
        "frontend mixer",
        f"  bind {bind_host}:{port}",
        f"  maxconn {s.max_connections}",
        "  option forwardfor",
        # when the request arrived: the replica counts the wait in the queue as the caller does
        # (mixer.admission.upstream_wait_s: quality factor, queue-wait histogram)
        "  http-request set-header X-Request-Start t=%[date(0,us)]",
        f"  default_backend {RETRY_TIER}",
        "",
        # Two tiers, so that a caller never sees a replica die. A replica killed while the kernel
        # still takes its connections and data (the ~0.1 s a dying 700 MB process takes to close
        # its sockets) resets them; HAProxy 2.6 retries such a request only if it was the first on
        # its client connection, and otherwise closes a keep-alive caller's connection without an
        # answer. Callers keep their connections, so this tier sends each request to the replica
        # tier on a connection of its own (first on it: retried there), and sends again what the
        # replica tier still answers 502.
        f"backend {RETRY_TIER}",
        f"  retries {s.retries}",
        "  retry-on conn-failure empty-response 502",
        "  option http-server-close  # a connection per request (an abstract socket: cheap)",
        f"  timeout server {s.queue_timeout_ms + s.server_timeout_ms}ms  # the replica tier's queue, then the answer",
        f"  server replicas {inner_socket}",
        "",
        "frontend replica_tier",
        f"  bind {inner_socket}",
        f"  maxconn {s.max_connections}",
        f"  default_backend {BACKEND}",
        "",
        "frontend stats",
        f"  bind {bind_host}:{stats_port}",
        "  http-request use-service prometheus-exporter if { path /metrics }",
        "  stats enable",
        "  stats uri /stats",
        "  stats refresh 5s",
        "",
        f"backend {BACKEND}",
        f"  balance {s.balance}",
        f"  retries {s.retries}",
        f"  retry-on {' '.join(s.retry_on)}",
        f"  option redispatch {s.redispatch_every}",
        f"  option httpchk GET {h.path}",
        "  http-check expect status 200",
        # the bounded queue: past max_queue waiting requests, refuse at once (as the mixer does)
        f"  http-request return status 503 content-type application/json string "
        f"{_json_message(f'overloaded: {s.max_queue} requests queued at the front door; retry later')} "
        f"{retry_after} if {{ queue() ge {s.max_queue} }}",
        f"  default-server check inter {h.interval_ms}ms fastinter {h.fast_interval_ms}ms "
        f"downinter {h.down_interval_ms}ms fall {h.fall} rise {h.rise} maxconn {maxconn}{observe}",
    ]
    lines += [f"  server {b.name} {b.host}:{b.port}" for b in backends]
    return "\n".join(lines) + "\n"


def check_config(path: Path) -> None:
    """Validate a config file with ``haproxy -c -f`` (the binary's own parser).

    Raises:
        ServiceError: haproxy is not installed, or rejects the file (its output in the message).
    """
    out = subprocess.run([require_haproxy(), "-c", "-f", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ServiceError(f"haproxy rejects {path}:\n{out.stdout}{out.stderr}")


def require_haproxy() -> str:
    """The ``haproxy`` binary's path.

    Raises:
        ServiceError: it is not installed (the message says how to install it).
    """
    binary = shutil.which("haproxy")
    if binary is None:
        raise ServiceError(_NOT_INSTALLED)
    return binary


_NOT_INSTALLED = ("haproxy not found on PATH. Install Debian's package with `apt-get install -y haproxy` "
                  "(scripts/setup.sh does this).")


def parse_stats_csv(text: str) -> list[dict[str, str]]:
    """Rows of HAProxy's stats CSV (Management Guide 9.1: ``# pxname,svname,...`` then one row per
    frontend, server and backend), as ``{column: value}``."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("# "):
        raise ValueError("not HAProxy stats CSV (no '# pxname,...' header)")
    reader = csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]])))
    return [dict(row) for row in reader]


@dataclass
class HAProxyServer(ManagedProcess):
    """Debian's ``haproxy`` in front of mixer replicas (see the module docstring).

    Attributes:
        name: record and log name in ``run/`` and config name in ``<state>/haproxy/``.
        host: address the front door and its stats frontend listen on.
        port: the front door's port (None: the recorded one if free, else a free one, at start).
        stats_port: the stats frontend's port (``/metrics``, ``/stats``; chosen the same way).
        backends: the replicas (as ``[name, host, port]`` lists in the record).
        settings: the ``front_door`` settings the config is rendered from.
        maxconn: requests per replica at once (:meth:`FrontDoorSettings.maxconn`).
    """

    name: str = "haproxy"
    host: str = "127.0.0.1"
    port: int | None = None
    stats_port: int | None = None
    backends: tuple = ()
    settings: FrontDoorSettings = field(default_factory=FrontDoorSettings)
    maxconn: int = 1

    service: ClassVar[str] = "haproxy"
    port_fields: ClassVar[tuple[str, ...]] = ("port", "stats_port")
    record_fields: ClassVar[tuple[str, ...]] = ("host", "backends", "maxconn")
    cmdline_marker: ClassVar[str] = "haproxy"
    start_timeout_s: ClassVar[float] = 30.0

    def __post_init__(self):
        self.backends = tuple(b if isinstance(b, Backend) else Backend(str(b[0]), str(b[1]), int(b[2]))
                              for b in self.backends)

    @property
    def record_name(self) -> str:
        return self.name

    def _find_kwargs(self) -> dict:
        return {"name": self.name}

    def _record_started(self, command: list[str]) -> None:
        # the record holds backends as JSON lists (find() turns them back into Backend)
        backends = self.backends
        self.backends = tuple([b.name, b.host, b.port] for b in backends)  # type: ignore[assignment]
        try:
            super()._record_started(command)
        finally:
            self.backends = backends

    @property
    def config_file(self) -> Path:
        """``<state>/haproxy/<name>.cfg``, rewritten at each start."""
        return self.state.root / "haproxy" / f"{self.name}.cfg"

    @property
    def url(self) -> str:
        """``http://<host>:<port>``: where callers send requests (loopback when listening on all
        addresses).

        Raises:
            ServiceError: not started or found.
        """
        return self._url(self.port)

    @property
    def stats_url(self) -> str:
        """``http://<host>:<stats_port>``: ``/metrics`` (Prometheus exporter) and ``/stats``."""
        return self._url(self.stats_port)

    def _url(self, port: int | None) -> str:
        if port is None:
            raise ServiceError(f"the front door {self.name!r} is not started: run "
                               "`home-mixer serve mixer start --replicas N` first")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "", "::") else self.host
        return f"http://{host}:{port}"

    @property
    def address(self) -> str:
        return f"{self.url} (metrics {self.stats_url}/metrics, stats {self.stats_url}/stats)"

    def write_config(self) -> Path:
        """Render the config for the chosen ports, check it with ``haproxy -c``, write it; returns its path.

        Raises:
            ServiceError: haproxy rejects it (the message has its output).
        """
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        text = render_config(self.settings, list(self.backends), bind_host=self.host, port=int(self.port),
                             stats_port=int(self.stats_port), maxconn=self.maxconn)
        tmp = self.config_file.with_suffix(".cfg.tmp")
        tmp.write_text(text)
        check_config(tmp)
        tmp.replace(self.config_file)
        return self.config_file

    def prepare(self) -> None:
        """Raises ServiceError if ``haproxy`` is not installed or there is no backend."""
        super().prepare()
        require_haproxy()
        if not self.backends:
            raise ServiceError("a front door needs at least one replica")

    def command(self) -> list[str]:
        self.write_config()  # ports are chosen when this is called
        # -db: stay in the foreground (the supervisor owns the process and its log)
        return [shutil.which("haproxy") or "haproxy", "-db", "-f", str(self.config_file)]

    def servers(self, timeout_s: float = 2.0) -> list[dict[str, str]]:
        """The backend's replicas as the stats CSV reports them: ``name``, ``status`` (UP, DOWN,
        "UP 1/2" while changing...), ``check`` (last check: L7OK, L7STS, L4CON...), ``queue`` and
        ``in_flight`` (current requests), ``retries``, ``redispatches``.

        Raises:
            ServiceError: the stats frontend does not answer.
        """
        try:
            r = httpx.get(f"{self.stats_url}/stats;csv", timeout=timeout_s)
            r.raise_for_status()
            rows = parse_stats_csv(r.text)
        except (httpx.HTTPError, ValueError) as e:
            raise ServiceError(f"the front door's stats at {self.stats_url}/stats;csv did not answer: {e}") from None
        return [{"name": row["svname"], "status": row["status"], "check": row.get("check_status", ""),
                 "queue": row.get("qcur", ""), "in_flight": row.get("scur", ""), "retries": row.get("wretr", ""),
                 "redispatches": row.get("wredis", "")}
                for row in rows if row["pxname"] == BACKEND and row["svname"] not in ("BACKEND", "FRONTEND")]

    def ready(self) -> bool:
        """True once every replica has passed its health checks ("UP", not the "UP 1/2" of a
        replica still being checked): the front door serves at full strength."""
        try:
            servers = self.servers(1.0)
        except ServiceError:
            return False
        return bool(servers) and all(s["status"] == "UP" and s["check"].startswith("L7OK") for s in servers)

    def live(self) -> bool:
        """True when the stats frontend answers."""
        try:
            self.servers(1.0)
            return True
        except ServiceError:
            return False

    def start(self, timeout_s: float | None = None) -> "HAProxyServer":
        """Write and check the config, start HAProxy, wait until every replica passed its health
        checks (default 30 s).

        Raises:
            ServiceError: haproxy is not installed or rejects the config, one already runs under
                this name for the state folder, a port is in use, or a replica was not healthy in
                time (the message has the end of the log; nothing is left running).
        """
        return super().start(timeout_s)  # type: ignore[return-value]

    def status_extra(self) -> dict[str, Any]:
        """``{"url", "metrics", "stats", "config", "servers"}`` (servers: :meth:`servers`, or the
        error when the stats do not answer)."""
        try:
            servers: Any = self.servers()
        except ServiceError as e:
            servers = str(e)
        return {"url": self.url, "metrics": f"{self.stats_url}/metrics", "stats": f"{self.stats_url}/stats",
                "config": str(self.config_file), "servers": servers}
