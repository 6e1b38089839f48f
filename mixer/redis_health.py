"""Redis as the mixer sees it: the client (retry, backoff, health check), whether Redis answers,
and a background watcher of the store versions that keys the shared caches.

A Redis restart (crash, failover) must not turn into errors for longer than it lasts, and an
outage must not make every request wait for connection attempts:

- ``redis_client``: redis-py retries a command once on ``ConnectionError`` / ``TimeoutError``
  after a short exponential backoff (a pooled connection broken by a restart reconnects on the
  first retry), and PINGs a connection idle for ``health_check_interval_s`` before using it.
  redis-py's default (3 retries, 1 s base backoff) would hold a request for seconds per command.
- ``RedisHealth``: a request that sees a connection error marks Redis down; while it is down the
  cached components answer from their last-known-good values at once (``check`` raises without
  I/O), and only the watcher probes Redis, every ``probe_s``.
- ``StoreWatcher``: one daemon thread per mixer process: every ``version_check_s`` it reads the
  index and feature versions in one round trip (``MixerCaches.apply_versions``); while Redis is
  down or buffered writes wait, it wakes every ``probe_s``, marks Redis up on the first answer and
  flushes the write buffer. So the mixer serves normally within about ``probe_s`` (0.25 s) of
  Redis answering again.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import redis
from pydantic import BaseModel, ConfigDict, Field
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core import online_layout as keys
from core.online_store import connect
from mixer.caches import MixerCaches, StoreVersions

log = logging.getLogger(__name__)


class RedisClientSettings(BaseModel):
    """The ``redis`` section of the mixer config.

    Attributes:
        socket_timeout_s: per-command socket timeout (s).
        connect_timeout_s: connect timeout (s).
        retries: retries of a command on a connection error or timeout.
        backoff_base_ms, backoff_cap_ms: exponential backoff between retries (ms).
        health_check_interval_s: PING a pooled connection idle this long before using it (s).
        probe_s: while Redis is down (or buffered writes wait), probe / flush this often (s).
        buffer_max_writes: served-posts / impression-log writes kept while Redis is down (one per
            request and side effect); older ones past it are dropped and counted.
        replica_window_s: Sentinel only: seconds reads stay on a replica after the primary failed
            one (``core.online_store.ReplicaFallbackRedis``).
        replica_acks: Sentinel only: side-effect writes end with ``WAIT replica_acks`` so a write
            counts as written once a replica has it too (a failover promotes that replica); 0: no WAIT.
        replica_ack_timeout_ms: WAIT's bound (ms); a write not acknowledged in time is on the
            primary only (counted ``unreplicated``, not sent again).
        replica_ack_pause_s: after an unacknowledged WAIT (no replica in sync), writes skip WAIT
            this long (s) instead of paying its timeout on every write.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    socket_timeout_s: float = Field(2.0, gt=0)
    connect_timeout_s: float = Field(1.0, gt=0)
    retries: int = Field(1, ge=0)
    backoff_base_ms: float = Field(10.0, gt=0)
    backoff_cap_ms: float = Field(100.0, gt=0)
    health_check_interval_s: float = Field(15.0, ge=0)
    probe_s: float = Field(0.25, gt=0)
    buffer_max_writes: int = Field(10_000, ge=1)
    replica_window_s: float = Field(0.5, gt=0)
    replica_acks: int = Field(1, ge=0)
    replica_ack_timeout_ms: int = Field(50, ge=1)
    replica_ack_pause_s: float = Field(5.0, ge=0)


def redis_client(url: str, settings: RedisClientSettings) -> redis.Redis:
    """A client of the online store at ``url`` (``redis://`` or ``redis+sentinel://``, opened by
    ``core.online_store.connect``) with the retry / backoff / health check of ``settings``; with
    Sentinel, reads fall back to a replica while the primary is unreachable.

    Raises:
        core.online_store.OnlineStoreAddressError: a malformed address.
    """
    return connect(
        url, replica_reads=True, replica_window_s=settings.replica_window_s,
        socket_timeout=settings.socket_timeout_s, socket_connect_timeout=settings.connect_timeout_s,
        retry=Retry(ExponentialBackoff(cap=settings.backoff_cap_ms / 1000.0, base=settings.backoff_base_ms / 1000.0),
                    settings.retries),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        health_check_interval=settings.health_check_interval_s)


class RedisUnavailable(redis.ConnectionError):
    """Redis is marked down (``RedisHealth``): no command was sent."""


class RedisHealth:
    """Whether Redis answered last; thread-safe (plain attribute writes).

    Attributes:
        up: False after a connection error until the watcher's next successful probe.
        down_since: ``time.time()`` when it went down (None while up).
        last_error: the error that marked it down ("" while up).
        outages: how many times it went down (this process).
    """

    def __init__(self, on_down: Callable[[], None] | None = None, name: str = "Redis"):
        self.on_down = on_down  # metrics: an outage began
        self.name = name  # in log lines: "Redis", or "the Redis primary" for the writes of an HA store
        self.up = True
        self.down_since: float | None = None
        self.last_error = ""
        self.outages = 0
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise ``RedisUnavailable`` while Redis is marked down (fail fast, no I/O)."""
        if not self.up:  # (down_since may lag a moment behind up: read without the lock)
            raise RedisUnavailable(f"Redis is marked down since {self.down_since} ({self.last_error})")

    def mark_down(self, error: BaseException) -> None:
        """A command failed to reach Redis (connection error or timeout)."""
        with self._lock:
            if self.up:
                self.down_since, self.outages = time.time(), self.outages + 1
                self.up = False
                log.warning("%s is down: %r; %s", self.name, error,
                            "serving from last-known-good caches" if self.name == "Redis" else "buffering writes")
                if self.on_down is not None:
                    self.on_down()
            self.last_error = repr(error)

    def mark_up(self) -> None:
        """Redis answered."""
        with self._lock:
            if not self.up:
                log.warning("%s is back after %.2f s", self.name, time.time() - (self.down_since or time.time()))
            self.up, self.down_since, self.last_error = True, None, ""

    def observe(self, error: BaseException) -> None:
        """Mark down if ``error`` means Redis is unreachable (not a command error like WRONGTYPE)."""
        if isinstance(error, (redis.ConnectionError, redis.TimeoutError)) and not isinstance(error, RedisUnavailable):
            self.mark_down(error)

    def summary(self) -> dict:
        """``{"up", "down_for_s", "last_error", "outages"}`` (``/healthz``)."""
        return {"up": self.up, "down_for_s": None if self.down_since is None else round(time.time() - self.down_since, 3),
                "last_error": self.last_error or None, "outages": self.outages}


def read_versions(client: redis.Redis) -> StoreVersions:
    """The index and feature versions in one round trip.

    Raises:
        redis.RedisError: Redis is unreachable.
    """
    pipe = client.pipeline(transaction=False)
    pipe.hmget(keys.INDEX_META, ["as_of", "built_at"])
    pipe.get(keys.FEATURE_VERSION)
    (as_of, built_at), features = pipe.execute()

    def s(v):
        return None if v is None else v.decode() if isinstance(v, bytes) else str(v)

    index = None if as_of is None and built_at is None else f"{s(as_of)}|{s(built_at)}"
    as_of_s = None
    if as_of is not None:
        try:
            as_of_s = float(s(as_of))
        except ValueError:  # an ISO instant
            from datetime import datetime

            try:
                as_of_s = datetime.fromisoformat(s(as_of).replace("Z", "+00:00")).timestamp()
            except ValueError:
                as_of_s = None
    return StoreVersions(index=index, index_as_of=as_of_s, features=s(features))


class StoreWatcher:
    """The background thread of one mixer process (``start`` / ``stop``): store versions, Redis
    liveness, buffered-write flushing (module docstring).

    Args:
        client: the mixer's Redis client.
        caches: the caches whose versions it keeps.
        health: marked up / down by each probe.
        version_check_s: seconds between version reads while all is well.
        probe_s: seconds between probes while Redis is down or ``pending()`` is true.
        flush: called after a successful probe while ``pending()``; returns when done or on error
            (the write buffer's ``flush``).
        pending: True while buffered writes wait.
    """

    def __init__(self, client: redis.Redis, caches: MixerCaches, health: RedisHealth, *, version_check_s: float,
                 probe_s: float, flush: Callable[[], object] | None = None,
                 pending: Callable[[], bool] = lambda: False):
        self.client = client
        self.caches = caches
        self.health = health
        self.version_check_s = version_check_s
        self.probe_s = probe_s
        self.flush = flush
        self.pending = pending
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check_once(self) -> bool:
        """Read the versions (dropping changed caches) and flush pending writes; True if Redis answered."""
        try:
            versions = read_versions(self.client)
        except redis.RedisError as e:
            self.health.observe(e)
            if not isinstance(e, (redis.ConnectionError, redis.TimeoutError)):
                log.warning("reading the store versions failed: %r", e)
            return False
        self.health.mark_up()
        dropped = self.caches.apply_versions(versions)
        if dropped:
            log.info("store versions changed (index %s, features %s): dropped caches %s",
                     versions.index, versions.features, dropped)
        if self.flush is not None and self.pending():
            self.flush()
        return True

    def start(self) -> "StoreWatcher":
        """Read the versions once now (so the first requests fill the right version), then watch."""
        self.check_once()
        self._thread = threading.Thread(target=self._run, name="hm-store-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.is_set():
            urgent = not self.health.up or self.pending()
            wait = self.probe_s if urgent else max(0.0, min(self.probe_s, last + self.version_check_s - time.monotonic()))
            if self._stop.wait(wait):
                return
            if urgent or time.monotonic() - last >= self.version_check_s:
                last = time.monotonic()
                try:
                    self.check_once()
                except Exception as e:  # noqa: BLE001 - the watcher must outlive any one failure
                    log.exception("store watcher: %r", e)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop the thread (waits up to ``timeout_s``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)




def guarded(health: RedisHealth | None, read: Callable[[], object]):
    """``read()``, failing fast while ``health`` says Redis is down and marking it down when the
    read finds Redis unreachable (``health`` None: just ``read()``).

    Raises:
        redis.RedisError: whatever ``read`` raised, or ``RedisUnavailable`` without I/O.
    """
    if health is None:
        return read()
    health.check()
    try:
        return read()
    except redis.RedisError as e:
        health.observe(e)
        raise


def read_through(cache, ids: list, read: Callable[[list], dict], health: RedisHealth | None):
    """Values of ``ids`` from ``cache`` (a ``mixer.caches.VersionedCache``, or None), the missing
    ones read with ``read(missing)`` (guarded by ``health``) and cached under the version current
    before the read (a build that lands meanwhile is not overwritten by older values).

    Returns:
        (id -> value for what was found or read, the ``redis.RedisError`` of a failed read or None:
        the caller answers from what it has, degraded).

    Raises:
        redis.RedisError: no cache and the read failed.
    """
    if cache is None:
        return guarded(health, lambda: read(ids)), None
    version = cache.version
    found, missing = cache.get_many(ids)
    values = dict(found)
    if missing:
        try:
            got = guarded(health, lambda: read(list(missing)))
        except redis.RedisError as e:
            return values, e
        cache.put_many(got, version)
        values.update(got)
    return values, None


__all__ = ["RedisClientSettings", "RedisHealth", "RedisUnavailable", "StoreWatcher", "guarded", "read_through",
           "read_versions", "redis_client"]
