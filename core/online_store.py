"""The online store's address, and the one place that turns it into a Redis client.

Every client of the online store (the mixer, the stream processor, the fan-out workers,
materialisation, the CLI and the jobs) is configured with one string and opens its client with
:func:`connect`, so a single Redis, a Sentinel-managed primary + replicas and a Redis Cluster share every call site.
Three forms are accepted:

- ``redis://[[user]:password@]host:port[/db]`` (also ``rediss://`` and ``unix://``): one Redis,
  opened with redis-py's ``Redis.from_url`` (the embedded default);
- ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service_name[/db]``: Redis Sentinel.
  The hosts are Sentinels, ``service_name`` the monitored primary's name (``sentinel monitor
  <name> ...``), the password that of the Redis nodes. The scheme is the one of the
  ``redis-sentinel-url`` package and of several services' configs (a comma-separated Sentinel list,
  then the service and the database as path segments).
- ``redis+cluster://[[user]:password@]host:port[,host:port...][/0]``: a Redis Cluster. The hosts
  are startup nodes (any nodes of the cluster; the client learns the rest with ``CLUSTER SLOTS``);
  a cluster has only database 0 (Redis Cluster specification, "Implemented subset").

With Sentinel, :func:`connect` returns redis-py's ``Sentinel.master_for`` client: each new
connection asks the Sentinels for the current primary, so after a failover the client writes to
the promoted replica without being told. ``replica_reads=True`` (the mixer) adds a fallback for
reads: while the primary cannot be reached (killed, or not yet replaced), read-only commands go to
a replica (``Sentinel.slave_for``) instead of failing; writes still fail, and their caller buffers
them (``mixer.side_effects.write_buffer``).

With a cluster, :func:`connect` returns redis-py's ``redis.cluster.RedisCluster``: each command
goes to the primary of its key's slot (CRC16 of the key, or of its ``{hash tag}``, mod 16384); a
script or ``MULTI`` must touch keys of one slot, which ``core.online_layout``'s hash tags give; a
pipeline is split by node and sent to each (redis-py's ``ClusterPipeline``). ``replica_reads=True``
sets redis-py's ``load_balancing_strategy`` to round robin (its ``read_from_replicas``): read-only
commands are spread over each slot's primary and replicas (a replica may lag by the replication
delay).

Sources: redis-py's ``redis.cluster`` (``RedisCluster``, ``ClusterNode``, ``read_from_replicas``,
``ClusterPipeline``); the Redis Cluster specification (key distribution, hash tags, multi-key
operations); redis-py's ``redis.sentinel`` (``Sentinel``, ``master_for``, ``slave_for``,
``MasterNotFoundError``); Redis Sentinel's documentation (replicas are read-only by default, so a
write sent to one is refused with ``READONLY`` rather than applied).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.commands import READ_COMMANDS
from redis.retry import Retry

SENTINEL_SCHEME = "redis+sentinel"
CLUSTER_SCHEME = "redis+cluster"
SINGLE_SCHEMES = ("redis", "rediss", "unix")
FORMS = ("redis://host:port/db (one Redis), "
         "redis+sentinel://host:port,host:port,host:port/service_name/db (Redis Sentinel) or "
         "redis+cluster://host:port,host:port,host:port (Redis Cluster)")

# Commands a replica can answer (redis-py's list of read-only commands, used by RedisCluster for
# read_from_replicas), plus PING, TIME (the real-time reader stamps against the server clock) and
# the script commands: the mixer's read paths run read-only Lua
# (feature groups, real-time window sums). A script that writes fails on a replica with READONLY
# (replica-read-only is Redis's default), so sending scripts there can never apply a write.
REPLICA_COMMANDS = frozenset(READ_COMMANDS) | {"PING", "ECHO", "TIME", "ROLE", "INFO", "XINFO", "EVALSHA", "EVAL",
                                                "SCRIPT"}


class OnlineStoreAddressError(ValueError):
    """An online-store address that cannot be used; the message says what was wrong and what to write."""


@dataclass(frozen=True)
class OnlineStoreAddress:
    """A parsed online-store address (:func:`parse_address`).

    Attributes:
        text: the address as given.
        sentinels: ``(host, port)`` of each Sentinel; empty for a single Redis or a cluster.
        cluster_nodes: ``(host, port)`` of each startup node of a Redis Cluster; empty otherwise.
        service: the primary's name known to the Sentinels (None for a single Redis).
        db: database number.
        username, password: credentials of the Redis nodes (None: none).
        ssl: TLS to the Redis nodes (``rediss://``; Sentinel addresses: never).
    """

    text: str
    sentinels: tuple[tuple[str, int], ...] = ()
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False

    @property
    def ha(self) -> bool:
        """True for a Sentinel address."""
        return bool(self.sentinels)

    @property
    def cluster(self) -> bool:
        """True for a Redis Cluster address."""
        return bool(self.cluster_nodes)

    def redacted(self) -> str:
        """The address with its password replaced by ``***`` (for logs and messages)."""
        if not self.password:
            return self.text
        return self.text.replace(f":{self.password}@", ":***@", 1)

    def __str__(self) -> str:
        return self.redacted()


def sentinel_address(sentinels: list[tuple[str, int]] | tuple[tuple[str, int], ...], service: str, db: int = 0,
                     password: str | None = None) -> str:
    """``redis+sentinel://[:password@]host:port,.../service/db`` for these Sentinels.

    Raises:
        OnlineStoreAddressError: no Sentinels, or a service name Sentinel would not accept.
    """
    text = (f"{SENTINEL_SCHEME}://{f':{password}@' if password else ''}"
            f"{','.join(f'{h}:{int(p)}' for h, p in sentinels)}/{service}/{int(db)}")
    parse_address(text)  # the same checks as any configured address
    return text


def cluster_address(nodes: list[tuple[str, int]] | tuple[tuple[str, int], ...], password: str | None = None) -> str:
    """``redis+cluster://[:password@]host:port,...`` for these startup nodes.

    Raises:
        OnlineStoreAddressError: no nodes, or a bad port.
    """
    text = f"{CLUSTER_SCHEME}://{f':{password}@' if password else ''}{','.join(f'{h}:{int(p)}' for h, p in nodes)}"
    parse_address(text)  # the same checks as any configured address
    return text


def _port(text: str, address: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise OnlineStoreAddressError(f"{address!r}: port {text!r} is not a number; write {FORMS}") from None
    if not 0 < port < 65536:
        raise OnlineStoreAddressError(f"{address!r}: port {port} is out of range 1-65535; write {FORMS}")
    return port


def _db(text: str, address: str) -> int:
    try:
        db = int(text)
    except ValueError:
        raise OnlineStoreAddressError(f"{address!r}: database {text!r} is not a number; write {FORMS}") from None
    if db < 0:
        raise OnlineStoreAddressError(f"{address!r}: database {db} is negative; write {FORMS}")
    return db


def parse_address(address: "str | OnlineStoreAddress") -> OnlineStoreAddress:
    """Check and split an online-store address (module docstring for the two forms).

    Raises:
        OnlineStoreAddressError: an empty address, another scheme, a Sentinel address without
            hosts, with a host lacking its port, with a bad port or database, or without a service
            name; a cluster address without nodes, with a host lacking its port, or with a database
            other than 0 or a service name; a ``redis://`` URL without a host. The message names what was wrong and the forms
            to write.
    """
    if isinstance(address, OnlineStoreAddress):
        return address
    if not isinstance(address, str) or not address.strip():
        raise OnlineStoreAddressError(f"no online-store address given; write {FORMS}")
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise OnlineStoreAddressError(f"{text!r} has no scheme; write {FORMS}")
    scheme = scheme.lower()
    if scheme in SINGLE_SCHEMES:
        u = urlparse(text)
        if scheme != "unix" and not u.hostname:
            raise OnlineStoreAddressError(f"{text!r} has no host; write {FORMS}")
        if scheme != "unix" and u.port is None and ":" in (u.netloc.rpartition("@")[2]):
            raise OnlineStoreAddressError(f"{text!r}: the port is empty; write {FORMS}")
        db = (u.path or "/").strip("/") if scheme != "unix" else "0"
        return OnlineStoreAddress(text=text, db=_db(db, text) if db else 0,
                                  username=unquote(u.username) if u.username else None,
                                  password=unquote(u.password) if u.password else None, ssl=scheme == "rediss")
    if scheme not in (SENTINEL_SCHEME, CLUSTER_SCHEME):
        raise OnlineStoreAddressError(f"{text!r}: unknown scheme {scheme!r}; write {FORMS}")
    what = "Sentinel" if scheme == SENTINEL_SCHEME else "cluster node"
    userinfo, _, hostpath = rest.rpartition("@")
    hosts, _, path = hostpath.partition("/")
    username = password = None
    if userinfo:
        user, colon, pw = userinfo.partition(":")
        username, password = (unquote(user) or None), (unquote(pw) if colon else None)
    nodes = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not item.strip():
            raise OnlineStoreAddressError(f"{text!r}: an empty {what} in the host list; write {FORMS}")
        if not colon or not host:
            raise OnlineStoreAddressError(f"{text!r}: {what} {item.strip()!r} needs host:port "
                                          f"({what}s have no default port here); write {FORMS}")
        nodes.append((host.strip("[]"), _port(port, text)))
    segments = [s for s in path.split("/") if s != ""] if path else []
    if scheme == CLUSTER_SCHEME:
        if segments not in ([], ["0"]):
            raise OnlineStoreAddressError(f"{text!r}: a Redis Cluster has only database 0 and no service name, "
                                          f"got path {path!r}; write {FORMS}")
        return OnlineStoreAddress(text=text, cluster_nodes=tuple(nodes), username=username, password=password)
    sentinels = nodes
    if not segments:
        raise OnlineStoreAddressError(f"{text!r}: no service name (the primary's name in `sentinel monitor`) "
                                      f"after the Sentinels; write {FORMS}")
    if len(segments) > 2:
        raise OnlineStoreAddressError(f"{text!r}: too many path segments {segments}; write {FORMS}")
    service = unquote(segments[0])
    if not all(c.isalnum() or c in "._-" for c in service):
        raise OnlineStoreAddressError(f"{text!r}: service name {service!r} may hold only letters, digits and "
                                      f"'.', '_', '-' (Sentinel's rule); write {FORMS}")
    return OnlineStoreAddress(text=text, sentinels=tuple(sentinels), service=service,
                              db=_db(segments[1], text) if len(segments) == 2 else 0,
                              username=username, password=password)


# ---------------------------------------------------------------- clients


def _default_retry() -> Retry:
    # 5 retries 0.1, 0.2, 0.4, 0.8, 1 s apart (2.5 s): a job or consumer rides out a local failover
    # (~2 s until Sentinel promotes the replica; each retry reconnects and asks the Sentinels for
    # the primary again). redis-py's default (3 retries, backoff from 1 s, jittered up to 10 s)
    # waits longer; the mixer passes its own (one retry after 10 ms: a request must not wait).
    return Retry(ExponentialBackoff(cap=1.0, base=0.05), 5)


class _ReplicaFallbackPipeline(redis.client.Pipeline):
    """A pipeline of a :class:`ReplicaFallbackRedis`: an all-read pipeline runs on a replica while
    the primary is unreachable; any other pipeline only on the primary."""

    def __init__(self, owner: "ReplicaFallbackRedis", transaction: bool, shard_hint):
        super().__init__(owner.connection_pool, owner.response_callbacks, transaction, shard_hint)
        self._owner = owner

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        owner = self._owner
        stack, scripts = list(self.command_stack), set(self.scripts)
        readable = bool(stack) and all(_command_name(args) in REPLICA_COMMANDS for args, _ in stack)
        if readable and owner.reading_from_replica():
            self.reset()
            return owner._replica_pipeline(stack, scripts, self.transaction, raise_on_error)
        try:
            return super().execute(raise_on_error)
        except (redis.ConnectionError, redis.TimeoutError):
            if not readable:
                raise
            owner.primary_failed()
            return owner._replica_pipeline(stack, scripts, self.transaction, raise_on_error)


def _command_name(args: tuple) -> str:
    name = args[0]
    if isinstance(name, bytes):
        name = name.decode()
    return str(name).split(" ", 1)[0].upper()


class ReplicaFallbackRedis(redis.Redis):
    """A client of the Sentinel-managed primary whose reads fall back to a replica.

    Built by :func:`connect` with ``replica_reads=True`` (redis-py's ``Sentinel.master_for`` with
    this class, plus ``replica``, a ``Sentinel.slave_for`` client). A read-only command
    (``REPLICA_COMMANDS``), or a pipeline of them, that fails to reach the primary with a connection
    error or timeout is sent to a replica; for the next ``replica_window_s`` seconds reads go to the
    replica at once (no connection attempt to a dead primary per command), then the primary is
    tried again. Writes always go to the primary: their connection errors reach the caller.

    A replica's data lags the primary's by the replication delay (milliseconds here); after a
    failover it is the new primary and ``slave_for`` falls back to it (redis-py's rotation ends on
    the primary).

    Attributes:
        replica: the ``slave_for`` client (set by :func:`connect`).
        replica_window_s: seconds reads stay on the replica after the primary failed.
        replica_reads: reads answered by the replica so far (this client).
    """

    replica: redis.Redis | None = None
    replica_window_s: float = 0.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._primary_failed_at = -math.inf
        self._lock = threading.Lock()
        self.replica_reads = 0

    def primary_failed(self) -> None:
        """A read could not reach the primary: read from the replica for ``replica_window_s``."""
        self._primary_failed_at = time.monotonic()

    def reading_from_replica(self) -> bool:
        """True while reads go straight to the replica (within ``replica_window_s`` of a failure)."""
        return time.monotonic() - self._primary_failed_at < self.replica_window_s

    def _count(self) -> None:
        with self._lock:
            self.replica_reads += 1

    def _replica_pipeline(self, stack, scripts, transaction: bool, raise_on_error: bool) -> list[Any]:
        self._count()
        pipe = self.replica.pipeline(transaction=transaction)
        pipe.command_stack = stack
        pipe.scripts = scripts
        return pipe.execute(raise_on_error)

    def execute_command(self, *args, **options):
        """Run one command (class docstring for where). Raises what redis-py raises."""
        if self.replica is None or _command_name(args) not in REPLICA_COMMANDS:
            return super().execute_command(*args, **options)
        if self.reading_from_replica():
            self._count()
            return self.replica.execute_command(*args, **options)
        try:
            return super().execute_command(*args, **options)
        except (redis.ConnectionError, redis.TimeoutError):
            self.primary_failed()
            self._count()
            return self.replica.execute_command(*args, **options)

    def pipeline(self, transaction: bool = True, shard_hint=None) -> redis.client.Pipeline:
        """A pipeline whose all-read batches fall back to the replica (class docstring)."""
        return _ReplicaFallbackPipeline(self, transaction, shard_hint)

    def close(self) -> None:
        """Close the primary's and the replica's connection pools."""
        try:
            super().close()
        finally:
            if self.replica is not None:
                self.replica.close()


def sentinel_manager(address: "str | OnlineStoreAddress", *, timeout_s: float = 0.5, **kwargs):
    """A redis-py ``Sentinel`` over the address's Sentinels.

    Sentinel connections get ``timeout_s`` (s) to connect and answer and no retries: redis-py asks
    the next Sentinel when one fails, and its default retry (backoff from 1 s) would hold every
    primary lookup behind a dead Sentinel. ``kwargs`` are the Redis nodes' connection options.

    Raises:
        OnlineStoreAddressError: not a Sentinel address.
    """
    from redis.sentinel import Sentinel

    a = parse_address(address)
    if not a.ha:
        raise OnlineStoreAddressError(f"{a}: not a Sentinel address; write "
                                      f"redis+sentinel://host:port,host:port/service_name/db")
    node = {"db": a.db, "username": a.username, "password": a.password, **kwargs}
    node = {k: v for k, v in node.items() if v is not None}
    return Sentinel(list(a.sentinels), sentinel_kwargs={"socket_timeout": timeout_s,
                                                        "socket_connect_timeout": timeout_s,
                                                        "retry": Retry(NoBackoff(), 0)}, **node)


def connect(address: "str | OnlineStoreAddress", *, replica_reads: bool = False, replica_window_s: float = 0.5,
            sentinel_timeout_s: float = 0.5, **kwargs) -> redis.Redis:
    """A Redis client of the online store at ``address`` (the module docstring's three forms).

    Args:
        address: ``redis://...``, ``redis+sentinel://...`` or ``redis+cluster://...``.
        replica_reads: Sentinel: reads fall back to a replica while the primary is unreachable
            (:class:`ReplicaFallbackRedis`); cluster: redis-py's ``read_from_replicas`` (reads
            spread over each slot's primary and replicas). Ignored for a single Redis.
        replica_window_s: seconds reads stay on the replica after the primary failed.
        sentinel_timeout_s: connect / answer timeout (s) of each Sentinel query.
        kwargs: redis-py connection options (``socket_timeout``, ``retry``, ``decode_responses``,
            ...); default ``retry``: 5 retries 0.1-1 s apart (2.5 s: rides out a ~2 s failover).

    Returns:
        a ``redis.Redis`` (for Sentinel, bound to the current primary through redis-py's
        ``SentinelConnectionPool``: no I/O happens until the first command), or for a cluster a
        ``redis.cluster.RedisCluster`` (:func:`cluster_client`: it asks a startup node for the
        slot map at once).

    Raises:
        OnlineStoreAddressError: a malformed address (the message says what to write).
        redis.exceptions.RedisClusterException: a cluster address none of whose nodes answers
            with a slot map (:func:`cluster_client`).
    """
    a = parse_address(address)
    kwargs.setdefault("retry", _default_retry())
    if a.cluster:
        return cluster_client(a, read_from_replicas=replica_reads, **kwargs)
    if not a.ha:
        return redis.Redis.from_url(a.text, **kwargs)
    if a.ssl:
        kwargs.setdefault("ssl", True)
    sentinel = sentinel_manager(a, timeout_s=sentinel_timeout_s)
    if not replica_reads:
        return sentinel.master_for(a.service, **kwargs)
    client = sentinel.master_for(a.service, redis_class=ReplicaFallbackRedis, **kwargs)
    client.replica = sentinel.slave_for(a.service, **kwargs)
    client.replica_window_s = float(replica_window_s)
    return client


def cluster_client(address: "str | OnlineStoreAddress", *, read_from_replicas: bool = False,
                   **kwargs) -> "HomeMixerCluster":
    """redis-py's ``RedisCluster`` (:class:`HomeMixerCluster`: its pipelines routed by slot) over
    the address's startup nodes (``ClusterNode`` each).

    ``kwargs`` are connection options of every node (``socket_timeout``, ``retry``,
    ``decode_responses``, ...); ``db`` is refused by redis-py in cluster mode and dropped here (a
    cluster address has database 0 only).

    Raises:
        OnlineStoreAddressError: not a cluster address.
        redis.exceptions.RedisClusterException: no startup node answered with the slot map (the
            cluster is not started, or not ``cluster_state:ok``).
    """
    from redis.cluster import ClusterNode, LoadBalancingStrategy

    a = parse_address(address)
    if not a.cluster:
        raise OnlineStoreAddressError(f"{a}: not a cluster address; write redis+cluster://host:port,host:port")
    kwargs.pop("db", None)
    if a.ssl:
        kwargs.setdefault("ssl", True)
    auth = {k: v for k, v in (("username", a.username), ("password", a.password)) if v is not None}
    # reads spread round-robin over each slot's primary and replicas (redis-py 5.3+'s form of
    # read_from_replicas, which it deprecates)
    balance = LoadBalancingStrategy.ROUND_ROBIN if read_from_replicas else None
    return HomeMixerCluster(startup_nodes=[ClusterNode(h, p) for h, p in a.cluster_nodes],
                            load_balancing_strategy=balance, **auth, **kwargs)


def is_cluster(client) -> bool:
    """True if ``client`` (or a pipeline of it) talks to a Redis Cluster: its scripts and
    transactions must keep to one slot, and cross-slot reads go through a cluster pipeline."""
    return isinstance(client, (RedisCluster, SlotRoutedPipeline))


def cluster_read(client, commands: list[tuple]) -> list[Any]:
    """The raw replies (no response callbacks: an ``HGETALL`` is a flat list) of many single-key
    commands (``(name, key, *args)``) on a Redis Cluster, in order: :func:`_run_routed` without
    the pipeline's bookkeeping (a request's ~800 feature reads: ~10 ms, one Redis's plain pipeline
    ~9 ms, redis-py's ``ClusterPipeline`` ~21 ms, measured on this 2-core machine under load).

    Raises:
        redis.RedisError: a node did not answer, or a command failed (the first error).
        ValueError: a command without a single key to route by.
    """
    stack = [(tuple(c), {}) for c in commands]
    out, unroutable = _run_routed(client, stack, parse=False)
    if unroutable:
        raise ValueError(f"cluster_read takes single-key commands; {commands[unroutable[0]][0]!r} is not routable")
    error = next((r for r in out if isinstance(r, Exception)), None)
    if error is not None:
        raise error
    return out


def node_of_key(cluster, key: bytes) -> str:
    """The name (``host:port``) of the primary that owns ``key``'s slot in ``cluster``'s cached slot
    map (CRC16 of the key or its hash tag mod 16384: the Redis Cluster specification)."""
    from redis.crc import key_slot

    return cluster.nodes_manager.get_node_from_slot(key_slot(key)).name


def run_on_nodes(cluster, commands: dict[str, tuple]) -> dict[str, Any]:
    """One raw command per primary (``{node name: (name, *args)}``, names from
    :func:`node_of_key`), every command written before any reply is read, so the nodes work at
    once: one round trip in all. For a script whose keys a node owns but that span many slots
    (``allow-cross-slot-keys``, keys in ARGV: ``hmget_node.lua``).

    Returns:
        per node its raw reply (no response callback), or the ``ResponseError`` it answered (a
        ``NOSCRIPT``, a key it does not own: the caller decides).

    Raises:
        redis.RedisError: a node did not answer (the connections in use are dropped, not pooled).
        KeyError: a node name the cluster does not know.
    """
    taken = []
    out: dict[str, Any] = {}
    try:
        for name, args in commands.items():
            node = cluster.get_node(node_name=name)
            if node is None:
                raise KeyError(f"{name} is not a node of this Redis Cluster")
            pool = cluster.get_redis_connection(node).connection_pool
            conn = pool.get_connection()
            taken.append((pool, conn, name))
            conn.send_packed_command(conn.pack_command(*args))
        for _, conn, name in taken:
            try:
                out[name] = conn.read_response()
            except redis.ResponseError as exc:
                out[name] = exc
    except BaseException:
        for _, conn, _ in taken:
            conn.disconnect()  # replies may be left unread: never back to the pool in use
        raise
    finally:
        for pool, conn, _ in taken:
            pool.release(conn)
    return out


def _routing_key(parser, args: tuple) -> bytes | None:
    """The key that routes ``args`` on a cluster: the only key of a single-key command, the first
    key of a script call (its keys share a slot); None for a keyless, multi-key or movable-keys
    command (redis-py's own routing takes those)."""
    name = args[0].decode() if isinstance(args[0], bytes) else str(args[0])
    name = name.lower()
    if name in ("evalsha", "eval", "evalsha_ro", "eval_ro"):
        key = args[3] if len(args) > 3 and int(args[2]) > 0 else None
    else:
        spec = parser.commands.get(name)
        if (spec is None or "movablekeys" in spec["flags"] or spec["first_key_pos"] != 1
                or spec["last_key_pos"] != 1 or len(args) < 2):
            return None
        key = args[1]
    if key is None:
        return None
    return key if isinstance(key, bytes) else str(key).encode()


def _run_routed(cluster, stack: list[tuple[tuple, dict]], parse: bool) -> tuple[list[Any], list[int]]:
    """Run ``(args, options)`` commands on the primaries of their keys' slots: every node's
    commands are written on one connection of it first, then every node's replies read, so the
    nodes work at once (one round trip in all). Slot: CRC16 of the key or its hash tag mod 16384
    (the Redis Cluster specification's key distribution; redis-py's ``key_slot`` and cached slot
    map). A ``MOVED`` / ``ASK`` reply (a slot being resharded; the command did not run) is sent
    again through redis-py's ``ClusterPipeline``, which follows it and refreshes the slot map.

    Returns:
        (per command its reply, with ``parse`` after redis-py's response callback, or its
        ``ResponseError``; the indexes of the commands not run because they have no single key to
        route by).

    Raises:
        redis.RedisError: a node did not answer (commands sent to other nodes may have run); the
            connections in use are dropped, not pooled.
    """
    from redis.crc import key_slot

    manager, parser = cluster.nodes_manager, cluster.commands_parser
    groups: dict[str, tuple] = {}
    unroutable: list[int] = []
    for i, (args, options) in enumerate(stack):
        key = _routing_key(parser, args)
        if key is None:
            unroutable.append(i)
            continue
        node = manager.get_node_from_slot(key_slot(key))
        group = groups.get(node.name)
        if group is None:
            group = groups[node.name] = (cluster.get_redis_connection(node), [])
        group[1].append(i)
    out: list[Any] = [None] * len(stack)
    redo: list[int] = []
    taken = []
    try:
        for node_client, at in groups.values():
            conn = node_client.connection_pool.get_connection()
            taken.append((node_client.connection_pool, conn))
            conn.send_packed_command(conn.pack_commands([stack[i][0] for i in at]))
        for (_, conn), (node_client, at) in zip(taken, groups.values()):
            for i in at:
                args, options = stack[i]
                try:
                    out[i] = (node_client.parse_response(conn, args[0], **options) if parse
                              else conn.read_response())
                except redis.exceptions.AskError:  # MOVED too (its subclass): sent again below
                    redo.append(i)
                except redis.ResponseError as exc:
                    out[i] = exc
    except BaseException:
        for _, conn in taken:
            conn.disconnect()  # replies may be left unread: never back to the pool in use
        raise
    finally:
        for pool, conn in taken:
            pool.release(conn)
    if redo:
        pipe = super(HomeMixerCluster, cluster).pipeline(transaction=False)
        for i in redo:
            pipe.execute_command(*stack[i][0], **stack[i][1])
        for i, reply in zip(redo, pipe.execute(raise_on_error=False)):
            out[i] = reply
    return out, unroutable


class SlotRoutedPipeline(redis.client.Pipeline):
    """The non-transactional pipeline of :class:`HomeMixerCluster`: each queued command goes to the
    primary of its key's slot, all nodes at once (:func:`_run_routed`: one round trip).

    redis-py's ``ClusterPipeline`` routes the same way with tens of microseconds of Python per
    command (policy lookup, node resolution; for a script call a ``COMMAND GETKEYS`` round trip)
    and asks the nodes one after the other. Commands this cannot route (keyless, multi-key,
    movable keys) are sent through ``ClusterPipeline`` after the others; a command is never sent
    twice unless its node answered ``MOVED`` / ``ASK`` (so never run twice). Scripts are not loaded
    on the way (redis-py's ``Script`` would): ``core.lua`` loads them on every primary at
    registration. Like ``ClusterPipeline``, not atomic across nodes.
    """

    def __init__(self, cluster: "HomeMixerCluster"):
        node = cluster.get_redis_connection(cluster.get_default_node())
        super().__init__(node.connection_pool, node.response_callbacks, False, None)
        self._cluster = cluster

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the queued commands (class docstring); replies in order, errors in place with
        ``raise_on_error=False``.

        Raises:
            redis.RedisError: a node did not answer (commands sent to other nodes may have run), or
                with ``raise_on_error`` the first command error.
        """
        stack = list(self.command_stack)
        self.reset()
        out, unroutable = _run_routed(self._cluster, stack, parse=True)
        if unroutable:
            pipe = super(HomeMixerCluster, self._cluster).pipeline(transaction=False)
            for i in unroutable:
                pipe.execute_command(*stack[i][0], **stack[i][1])
            for i, reply in zip(unroutable, pipe.execute(raise_on_error=False)):
                out[i] = reply
        if raise_on_error:
            error = next((r for r in out if isinstance(r, Exception)), None)
            if error is not None:
                raise error
        return out


class HomeMixerCluster(RedisCluster):
    """redis-py's ``RedisCluster`` (:func:`cluster_client`) whose non-transactional pipelines are
    :class:`SlotRoutedPipeline`\\ s; ``pipeline(transaction=True)`` (one slot, ``MULTI``) gives
    redis-py's own ``ClusterPipeline``."""

    def pipeline(self, transaction=None, shard_hint=None):
        """A :class:`SlotRoutedPipeline`, or with ``transaction`` redis-py's transactional one."""
        if transaction or shard_hint:
            return super().pipeline(transaction=transaction, shard_hint=shard_hint)
        return SlotRoutedPipeline(self)


def has_replica_reads(client: redis.Redis) -> bool:
    """True if ``client`` reads from a replica while the primary is unreachable (:func:`connect`
    with ``replica_reads``): its writes can fail while its reads succeed."""
    return isinstance(client, ReplicaFallbackRedis) and client.replica is not None


def current_primary(address: "str | OnlineStoreAddress", timeout_s: float = 0.5) -> tuple[str, int]:
    """``(host, port)`` of the primary: the Sentinels' current answer, or the single Redis's own.

    Raises:
        redis.sentinel.MasterNotFoundError: no Sentinel knows a primary that is up now.
        OnlineStoreAddressError: a malformed address.
    """
    a = parse_address(address)
    if a.cluster:
        raise OnlineStoreAddressError(f"{a}: a Redis Cluster has one primary per shard; ask the client "
                                      "(RedisCluster.get_primaries) instead")
    if not a.ha:
        u = urlparse(a.text)
        return u.hostname or "127.0.0.1", u.port or 6379
    manager = sentinel_manager(a, timeout_s=timeout_s)
    try:
        host, port = manager.discover_master(a.service)
        return str(host), int(port)
    finally:
        for s in manager.sentinels:
            s.close()


def feast_online_store(address: "str | OnlineStoreAddress") -> dict[str, str]:
    """Feast's ``RedisOnlineStoreConfig`` fields for ``address``: ``connection_string``,
    ``redis_type`` and ``sentinel_master``.

    Feast's Redis online store takes ``host:port[,key=value...]`` (the options become redis-py
    keyword arguments) and ``redis_type: redis | redis_cluster | redis_sentinel``; with
    ``redis_sentinel`` the hosts are Sentinels and ``sentinel_master`` the service name, and Feast
    writes through ``Sentinel(...).master_for(sentinel_master)`` (feast
    ``infra/online_stores/redis.py``; the option list is in the ``RedisOnlineStoreConfig``
    reference). Dropping the db or password would make Feast write elsewhere than the mixer reads.

    Raises:
        OnlineStoreAddressError: a malformed address, or a ``unix://`` one (Feast's form has no
            socket path).
    """
    a = parse_address(address)
    if a.cluster:
        hosts = [f"{h}:{p}" for h, p in a.cluster_nodes]
        redis_type, master = "redis_cluster", "mymaster"  # Feast's default name; unused for a cluster
    elif a.ha:
        hosts = [f"{h}:{p}" for h, p in a.sentinels]
        redis_type, master = "redis_sentinel", a.service
    else:
        u = urlparse(a.text)
        if u.scheme == "unix":
            raise OnlineStoreAddressError(f"{a}: Feast cannot reach Redis over a unix socket; write redis://host:port/db")
        hosts = [f"{u.hostname}:{u.port or 6379}"]
        redis_type, master = "redis", "mymaster"  # Feast's default name; unused for a single Redis
    parts = list(hosts)
    if a.db:
        parts.append(f"db={a.db}")
    if a.username:
        parts.append(f"username={a.username}")
    if a.password:
        parts.append(f"password={a.password}")
    if a.ssl:
        parts.append("ssl=true")
    return {"connection_string": ",".join(parts), "redis_type": redis_type, "sentinel_master": master}


__all__ = ["CLUSTER_SCHEME", "FORMS", "HomeMixerCluster", "SlotRoutedPipeline", "cluster_address", "cluster_client",
           "cluster_read", "is_cluster", "OnlineStoreAddress", "OnlineStoreAddressError", "REPLICA_COMMANDS", "ReplicaFallbackRedis",
           "connect", "current_primary", "feast_online_store", "has_replica_reads", "parse_address",
           "sentinel_address", "sentinel_manager"]
