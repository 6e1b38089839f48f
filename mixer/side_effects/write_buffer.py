"""A bounded in-memory buffer of side-effect writes that Redis could not take, flushed in order
once it answers again.

The served-posts record and the impression log are the mixer's own data (previously-seen
filtering, future training rows): a Redis outage must delay them, not lose them silently. A
write is a function that adds its commands to a pipeline (``WriteOps``); ``write`` runs it at
once while nothing waits, and otherwise appends it behind the waiting ones, so a stream keeps its
order. The bound is in writes (one per request and side effect); past it the oldest writes are
dropped and counted (``hm_mixer_side_effect_buffer_dropped_total{side_effect}``): the newest
served posts matter most for previously-seen filtering.

Delivery is at least once: a connection lost in the middle of a flushed pipeline is retried whole,
so a few impression-log entries may be written twice (served-posts ZADDs are idempotent).

With a Sentinel-managed store (``replica_acks`` > 0) each pipeline ends with ``WAIT replica_acks
timeout``: a write counts as written once a replica has it too, so a SIGKILL of the primary right
after cannot lose it (Sentinel promotes that replica). Replication stays asynchronous for everyone
else, and WAIT is best effort (Redis's documentation of WAIT: a synchronously replicated write can
still be lost in rare failovers). A write whose WAIT times out is on the primary only: it is
counted ``unreplicated`` (the exposure window: it is lost if the primary dies before the replica
catches up), not sent again; then WAIT is skipped for ``ack_pause_s`` (a replica is down: every
write would wait out the timeout) and the writes of the pause are counted ``unreplicated`` too. The buffer's ``health`` is the primary's: with Sentinel it is
not the mixer's read health, since reads go on from a replica while writes wait for a new primary.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable, Literal

import redis
from redis.client import Pipeline

from mixer.components import Fallback
from mixer.redis_health import RedisHealth

log = logging.getLogger(__name__)

WriteOps = Callable[[Pipeline], None]


class RedisWriteBuffer:
    """Writes of the side effects, direct or buffered (module docstring); thread-safe. The mixer's
    ``StoreWatcher`` calls ``flush`` after each successful probe while ``pending``.

    Args:
        client: Redis.
        health: marked down when a write finds Redis unreachable; while down, writes are buffered
            without trying.
        max_writes: bound of the buffer (writes).
        flush_batch: writes per flushed pipeline.
        on_drop: ``(side effect name, n)`` when writes are dropped past the bound (metrics).
        on_flush: ``(side effect name, n)`` when buffered writes reached Redis (metrics).
        replica_acks: replicas each pipeline waits for (``WAIT``); 0 (a single Redis): no WAIT.
        ack_timeout_ms: WAIT's timeout (ms).
        ack_pause_s: seconds WAIT is skipped after one timed out.
        on_unreplicated: ``(side effect name, n)`` for writes the primary took but no replica
            acknowledged within ``ack_timeout_ms`` (metrics).

    Raises:
        ValueError: ``max_writes`` or ``flush_batch`` < 1, or ``replica_acks`` < 0.
    """

    def __init__(self, client: redis.Redis, health: RedisHealth, max_writes: int = 10_000, flush_batch: int = 200,
                 on_drop: Callable[[str, int], None] | None = None,
                 on_flush: Callable[[str, int], None] | None = None, *, replica_acks: int = 0,
                 ack_timeout_ms: int = 50, ack_pause_s: float = 5.0,
                 on_unreplicated: Callable[[str, int], None] | None = None):
        if max_writes < 1 or flush_batch < 1 or replica_acks < 0:
            raise ValueError(f"max_writes and flush_batch must be >= 1 and replica_acks >= 0, got {max_writes}, "
                             f"{flush_batch}, {replica_acks}")
        self.client = client
        self.health = health
        self.max_writes = int(max_writes)
        self.flush_batch = int(flush_batch)
        self.on_drop = on_drop
        self.on_flush = on_flush
        self.replica_acks = int(replica_acks)
        self.ack_timeout_ms = int(ack_timeout_ms)
        self.ack_pause_s = float(ack_pause_s)
        self.on_unreplicated = on_unreplicated
        self._ack_paused_until = 0.0
        self._queue: deque[tuple[str, WriteOps]] = deque()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flusher at a time keeps the order
        self.dropped: dict[str, int] = {}
        self.flushed: dict[str, int] = {}
        self.unreplicated: dict[str, int] = {}

    def _wait_for_replicas(self, pipe: Pipeline) -> Literal["off", "waited", "paused"]:
        """Append ``WAIT`` to ``pipe`` if acknowledgements are wanted now. Returns "off" (no
        replicas wanted), "waited" (WAIT appended: its reply is the pipeline's last) or "paused"
        (a recent WAIT timed out: the writes go unconfirmed)."""
        if self.replica_acks <= 0:
            return "off"
        if time.monotonic() < self._ack_paused_until:
            return "paused"
        pipe.execute_command("WAIT", self.replica_acks, self.ack_timeout_ms)
        return "waited"

    def _acknowledged(self, wait: str, results: list, names: list[str]) -> None:
        """Count as ``unreplicated`` the writes ``names`` of a pipeline whose WAIT returned fewer
        than ``replica_acks`` (and pause WAIT), or that went while WAIT was paused."""
        if wait == "off":
            return
        if wait == "waited":
            acks = results[-1]
            if isinstance(acks, Exception) or int(acks) >= self.replica_acks:
                return
            self._ack_paused_until = time.monotonic() + self.ack_pause_s
            log.warning("%d side-effect writes reached the primary but %d of %d replicas acknowledged them within "
                        "%d ms; not waiting for replicas for %.0f s", len(names), int(acks), self.replica_acks,
                        self.ack_timeout_ms, self.ack_pause_s)
        counts: dict[str, int] = {}
        for name in names:
            counts[name] = counts.get(name, 0) + 1
        for name, n in counts.items():
            self.unreplicated[name] = self.unreplicated.get(name, 0) + n
            if self.on_unreplicated is not None:
                self.on_unreplicated(name, n)

    def __len__(self) -> int:
        return len(self._queue)

    def pending(self) -> bool:
        """True while buffered writes wait."""
        return bool(self._queue)

    def write(self, name: str, ops: WriteOps) -> Literal["written", "queued", "buffered"]:
        """Write now, or buffer.

        Returns:
            "written": Redis took it now. "queued": earlier writes still wait, so it went behind
            them (Redis may well be up; the watcher flushes within ``probe_s``). "buffered": Redis
            was unreachable (marked down, or the write failed with a connection error or timeout).

        Raises:
            redis.RedisError: any other Redis error (a bad command: not buffered, it would fail again).
        """
        if self.health.up and not self._queue:
            pipe = self.client.pipeline(transaction=False)
            ops(pipe)
            wait = self._wait_for_replicas(pipe)
            try:
                results = pipe.execute()
                self._acknowledged(wait, results, [name])
                return "written"
            except (redis.ConnectionError, redis.TimeoutError) as e:
                self.health.observe(e)
                self._append(name, ops)
                return "buffered"
        was_down = not self.health.up
        self._append(name, ops)
        return "buffered" if was_down else "queued"

    def _append(self, name: str, ops: WriteOps) -> None:
        dropped = None
        with self._lock:
            if len(self._queue) >= self.max_writes:
                dropped = self._queue.popleft()[0]
                self.dropped[dropped] = self.dropped.get(dropped, 0) + 1
            self._queue.append((name, ops))
        if dropped is not None:
            if self.on_drop is not None:
                self.on_drop(dropped, 1)
            if self.dropped[dropped] in (1, 10, 100, 1000) or self.dropped[dropped] % 10_000 == 0:
                log.warning("side-effect buffer full (%d writes): dropped %d %s writes so far",
                            self.max_writes, self.dropped[dropped], dropped)

    def flush(self) -> int:
        """Write the buffered writes, oldest first, ``flush_batch`` per pipeline, until empty or a
        connection error (they stay buffered; the health is marked down). A write Redis refuses
        (a command error: wrong key type, out of memory) is dropped and counted, not retried: the
        rest of its batch is already written. Returns the writes flushed (refused ones included)."""
        done = 0
        with self._flush_lock:
            while True:
                with self._lock:
                    batch = [self._queue[i] for i in range(min(self.flush_batch, len(self._queue)))]
                if not batch:
                    return done
                pipe = self.client.pipeline(transaction=False)
                spans = []  # each write's commands in the pipeline: a write may issue several
                for _, ops in batch:
                    start = len(pipe.command_stack)
                    ops(pipe)
                    spans.append((start, len(pipe.command_stack)))
                wait = self._wait_for_replicas(pipe)
                try:
                    # every command runs; a command error (WRONGTYPE, OOM) comes back in its slot
                    # instead of raising after the others were written (a retry would repeat them)
                    results = pipe.execute(raise_on_error=False)
                except redis.RedisError as e:  # the connection failed: nothing is known written
                    if self.health.up:  # once per outage: the watcher retries every probe_s
                        log.warning("flushing %d buffered side-effect writes failed: %r; kept", len(batch), e)
                    self.health.observe(e)
                    return done
                self.health.mark_up()  # the primary took them (with Sentinel: perhaps a new one)
                self._acknowledged(wait, results, [name for name, _ in batch])
                rejected: dict[str, int] = {}
                for (name, _), (lo, hi) in zip(batch, spans):
                    if any(isinstance(r, Exception) for r in results[lo:hi]):
                        rejected[name] = rejected.get(name, 0) + 1
                for name, n in rejected.items():  # Redis refused them: retrying cannot help; counted
                    self.dropped[name] = self.dropped.get(name, 0) + n
                    if self.on_drop is not None:
                        self.on_drop(name, n)
                    log.warning("Redis refused %d buffered %s writes: %r; dropped", n, name,
                                next(r for r in results if isinstance(r, Exception)))
                counts: dict[str, int] = {}
                with self._lock:
                    # pop what was flushed; writes dropped meanwhile (a full buffer) shifted the
                    # queue, so pop by identity, never more than the batch
                    ids = {id(entry) for entry in batch}
                    while self._queue and id(self._queue[0]) in ids:
                        name = self._queue.popleft()[0]
                        counts[name] = counts.get(name, 0) + 1
                for name, n in counts.items():
                    self.flushed[name] = self.flushed.get(name, 0) + n
                    if self.on_flush is not None:
                        self.on_flush(name, n)
                done += len(batch)

    def stats(self) -> dict:
        """``{"pending", "max", "dropped": {name: n}, "flushed": {name: n}, "unreplicated": {name: n},
        "primary": health summary}`` (``/healthz``; ``primary`` is the health of the writes' Redis)."""
        return {"pending": len(self._queue), "max": self.max_writes, "dropped": dict(self.dropped),
                "flushed": dict(self.flushed), "unreplicated": dict(self.unreplicated),
                "primary": self.health.summary()}


def submit(client: redis.Redis, buffer: RedisWriteBuffer | None, name: str, ops: WriteOps, what: str) -> None:
    """A side effect's writes: through ``buffer`` when the mixer has one, else straight to Redis.

    Raises:
        mixer.components.Fallback: Redis was unreachable and the writes were buffered (the side
            effect is reported degraded; ``what`` names them in the reason).
        redis.RedisError: without a buffer, any Redis error; with one, a bad command.
    """
    if buffer is not None:
        if buffer.write(name, ops) == "buffered":
            raise Fallback(None, f"Redis unavailable: {what} buffered")
        return
    pipe = client.pipeline(transaction=False)
    ops(pipe)
    pipe.execute()


__all__ = ["RedisWriteBuffer", "WriteOps", "submit"]
