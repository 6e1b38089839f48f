"""The event bus: a small interface (``EventBus``) and its Redis Streams implementation.

Semantics (at least once, nothing dropped silently):
- ``publish`` validates nothing more (events are models, valid by construction) and appends the
  entry to the topic's stream, trimmed to about ``maxlen`` entries.
- ``consume`` reads new entries for a consumer group; the consumer calls ``ack`` only after its
  feature write succeeded, so a crash before the write leaves the entry pending.
- ``reclaim`` takes over entries another consumer of the group left pending for ``min_idle_ms``
  (a crashed consumer) and returns them like ``consume``.
- An entry that is not a valid event, that was delivered more than ``max_deliveries`` times
  (a poison entry that crashes every consumer), or that was trimmed away while still pending is
  written to the topic's dead-letter stream with the reason and the original fields and id, and
  acknowledged in the same transaction. The dead-letter stream is never trimmed.
- Entries trimmed before the group read them (consumers down longer than the retention) are
  reported by ``skip_trimmed`` as one dead letter naming the gap.
- ``applied_until`` says up to when a group has acknowledged every entry (the consumers'
  liveness, on the broker's clock): the stream processor stamps it into the online store for the
  mixer.

The interface is deliberately small (publish / consume / ack / reclaim / dead_letter /
skip_trimmed / applied_until; ``poll`` = skip_trimmed + consume in one call) so a Kafka implementation can follow: topic = Kafka topic, group =
consumer group, ack = offset commit, reclaim = partition rebalance, dead letter = a ``<topic>.dead``
topic, skip_trimmed = offset out of range, applied_until = the minimum over partitions of the
timestamp of the message at the committed offset (the broker's time when every partition is
committed to its end).

Redis layout (``core.online_layout``): stream ``event_stream(topic)``, dead letters
``dead_letter_stream(topic)``. Stream ids are ``"<ms>-<seq>"`` strings (Redis server time in ms).
The bus's Lua scripts are ``pipelines/streaming/lua/{skip_trimmed,applied_until}.lua``
(``pipelines.streaming.scripts``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import redis

from core.online_layout import dead_letter_stream, event_stream
from pipelines.streaming.events import (
    AnyEvent,
    EngagementEvent,
    EventValidationError,
    PostCreatedEvent,
    PostDeletedEvent,
    SocialGraphEvent,
    encode_event,
    parse_event,
)
from pipelines.streaming.scripts import (
    APPLIED_UNTIL, SKIP_TRIMMED, AppliedUntilArgs, AppliedUntilKeys, SkipTrimmedArgs, SkipTrimmedKeys,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """One stream entry handed to a consumer.

    ``id`` is the stream id (``"<ms>-<seq>"``); ``event`` the validated event (``None`` only in a
    delivery built by hand for ``dead_letter``: ``consume`` and ``reclaim`` dead-letter invalid
    entries themselves); ``fields`` the raw entry fields (bytes -> bytes); ``delivery_count`` how
    many times the group delivered it (1 on first read, more after reclaims).
    """

    topic: str
    group: str
    id: str
    event: AnyEvent | None
    fields: dict[bytes, bytes]
    delivery_count: int


@dataclass(frozen=True)
class DeadLetter:
    """One dead-letter entry: why, which original entry (topic, id, group) and its raw fields."""

    id: str
    reason: str
    original_topic: str
    original_id: str
    group: str
    fields: dict[bytes, bytes]


@dataclass(frozen=True)
class Backlog:
    """Consumer lag of one group on one topic: ``lag`` entries not yet delivered to the group
    (``None`` if unknown), ``pending`` delivered but not acknowledged, ``dead_letters`` entries in
    the topic's dead-letter stream (all groups)."""

    lag: int | None
    pending: int
    dead_letters: int


@runtime_checkable
class EventBus(Protocol):
    """The bus every producer and consumer uses; implementations: ``RedisStreamsBus``."""

    def publish(self, topic: str, event: AnyEvent) -> str:
        """Append ``event`` to ``topic``; returns its id."""

    def publish_many(self, items: list[tuple[str, AnyEvent]]) -> list[str]:
        """Append ``(topic, event)`` pairs in order; returns their ids."""

    def consume(self, topic: str, group: str, consumer: str, count: int = 100,
                block_ms: int | None = None) -> list[Delivery]:
        """Up to ``count`` new valid events for ``consumer`` of ``group`` (waits up to ``block_ms``)."""

    def poll(self, topic: str, group: str, consumer: str, count: int = 100,
             block_ms: int | None = None) -> tuple[int, list[Delivery]]:
        """``skip_trimmed`` then ``consume``, in one call to the broker where it allows: ``(entries
        lost to trimming before the group read them, the deliveries)``. (Kafka's poll reports an
        offset out of range the same way.)"""

    def consume_own_pending(self, topic: str, group: str, consumer: str, count: int = 100) -> list[Delivery]:
        """All events delivered to ``consumer`` earlier and not acknowledged (after a restart or an
        error), read ``count`` per call (a page size, not a cap)."""

    def ack(self, delivery: Delivery) -> None:
        """Mark ``delivery`` processed for its group (call after the feature write)."""

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """``ack`` of several deliveries (any topics / groups) in as few calls as the broker allows."""

    def backlog(self, topic: str, group: str) -> "Backlog":
        """How far ``group`` is behind on ``topic`` (consumer lag), for monitoring."""

    def reclaim(self, topic: str, group: str, consumer: str, min_idle_ms: int,
                count: int = 100) -> list[Delivery]:
        """Take over up to ``count`` entries pending longer than ``min_idle_ms`` in ``group``."""

    def dead_letter(self, delivery: Delivery, reason: str) -> str:
        """Move ``delivery`` to the topic's dead-letter stream and acknowledge it; returns the dead-letter id."""

    def skip_trimmed(self, topic: str, group: str) -> int:
        """Entries the retention cap removed before ``group`` read them (Kafka: offset out of range):
        record the gap as one dead letter, move the group past it, return how many were lost."""

    def applied_until(self, topic: str, group: str) -> float | None:
        """The time (epoch s, on the broker's clock) before which ``group`` has acknowledged
        (applied or dead-lettered) every entry of ``topic``: the time of the oldest entry not yet
        delivered to the group or still pending in it, or the broker's current time when there is
        none. ``None`` if the topic or the group does not exist. Read atomically; a consumer that
        stopped or fell behind stops advancing it. (Kafka: the minimum over partitions of the
        timestamp of the message at the group's committed offset.)"""


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class RedisStreamsBus:
    """``EventBus`` on Redis Streams (Redis >= 6.2 for XAUTOCLAIM; tested on 7.0).

    Args:
        client: a ``redis.Redis`` with ``decode_responses=False`` (fields stay bytes, so a
            non-UTF-8 payload reaches the dead-letter stream unchanged).
        maxlen: approximate cap on entries per topic stream (``XADD MAXLEN ~``: Redis trims whole
            macro nodes, so the length can exceed it by up to one node, 100 entries by default).
        max_deliveries: an entry reclaimed more often than this is a poison entry and goes to the
            dead-letter stream instead of being handed out again.
        group_start_id: where a new consumer group starts reading: ``"0"`` = the whole retained
            stream (no event published before the group existed is missed), ``"$"`` = only new ones.

    Raises:
        ValueError: ``maxlen`` < 1 or ``max_deliveries`` < 1.
    """

    def __init__(self, client: redis.Redis, maxlen: int = 1_000_000, max_deliveries: int = 5,
                 group_start_id: str = "0"):
        if maxlen < 1:
            raise ValueError(f"maxlen must be >= 1, got {maxlen}")
        if max_deliveries < 1:
            raise ValueError(f"max_deliveries must be >= 1, got {max_deliveries}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("RedisStreamsBus needs a client with decode_responses=False (payloads are bytes)")
        self.client = client
        self.maxlen = maxlen
        self.max_deliveries = max_deliveries
        self.group_start_id = group_start_id
        self._groups: set[tuple[str, str]] = set()  # groups known to exist (saves a round trip per read)
        self._skip_trimmed = SKIP_TRIMMED.register(client)
        self._applied_until = APPLIED_UNTIL.register(client)

    # ---- producer ----
    def publish(self, topic: str, event: AnyEvent) -> str:
        """XADD the event's fields (``encode_event``) to the topic's stream with ``MAXLEN ~ maxlen``.

        Returns the stream id. Raises ``TypeError`` for a non-event, ``ValueError`` for a bad topic.
        """
        key = event_stream(topic)
        return _s(self.client.xadd(key, encode_event(event), maxlen=self.maxlen, approximate=True))

    def publish_many(self, items: list[tuple[str, AnyEvent]]) -> list[str]:
        """``publish`` of several ``(topic, event)`` pairs in one pipelined round trip, in order.

        Not atomic: if the connection drops, a prefix may have been appended; publishing the same
        events again is safe downstream (consumers are idempotent by event id).
        """
        pipe = self.client.pipeline(transaction=False)
        for topic, event in items:
            pipe.xadd(event_stream(topic), encode_event(event), maxlen=self.maxlen, approximate=True)
        return [_s(i) for i in pipe.execute()] if items else []

    # ---- consumer ----
    def ensure_group(self, topic: str, group: str) -> None:
        """XGROUP CREATE ... MKSTREAM; an existing group (BUSYGROUP) is fine."""
        key = event_stream(topic)
        if (key, group) in self._groups:
            return
        try:
            self.client.xgroup_create(key, group, id=self.group_start_id, mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((key, group))

    def consume(self, topic: str, group: str, consumer: str, count: int = 100,
                block_ms: int | None = None) -> list[Delivery]:
        """XREADGROUP up to ``count`` new entries (``>``) for ``consumer``.

        ``block_ms``: ``None`` returns at once, ``N`` waits up to N ms for an entry (``0`` would wait
        forever). Invalid entries are dead-lettered (and acknowledged) here; the returned list holds
        valid events only, in stream order, each with ``delivery_count == 1``.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.ensure_group(topic, group)
        key = event_stream(topic)
        try:
            resp = self.client.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # The stream or group was deleted since we created it: recreate and read again.
            self._groups.discard((key, group))
            self.ensure_group(topic, group)
            resp = self.client.xreadgroup(group, consumer, {key: ">"}, count=count, block=block_ms)
        entries = resp[0][1] if resp else []
        return self._deliver(topic, group, [(_s(i), f, 1) for i, f in entries])

    def poll(self, topic: str, group: str, consumer: str, count: int = 100,
             block_ms: int | None = None) -> tuple[int, list[Delivery]]:
        """``skip_trimmed`` and ``consume`` in one pipelined round trip: the check runs on the
        server right before the XREADGROUP (a consumer's loop called them one round trip apart,
        twice the latency per batch). Returns ``(entries lost, deliveries)`` as the two would.

        The check is sent as EVAL (the script's text, ~1.5 KB): a pipeline of EVALSHA would need a
        ``SCRIPT EXISTS`` round trip first (redis-py's ``Script``), and a ``NoScriptError`` after
        the read could no longer count a gap the read went past.

        Raises:
            ValueError: ``count`` < 1.
            redis.RedisError: the round trip failed, or a reply other than a missing group.
        """
        pipe = self.client.pipeline(transaction=False)
        self.queue_poll(pipe, topic, group, consumer, count, block_ms)  # checks count
        lost, resp = pipe.execute(raise_on_error=False)
        return self.take_poll(topic, group, consumer, lost, resp, count, block_ms)

    def queue_poll(self, pipe, topic: str, group: str, consumer: str, count: int = 100,
                   block_ms: int | None = None) -> None:
        """Queue ``poll``'s two commands (the trimmed-entries check and XREADGROUP) at the end of
        ``pipe`` (a non-transactional pipeline on this bus's server), so a caller can send them
        with its own writes in one round trip; :meth:`take_poll` turns their two replies into
        ``poll``'s answer. Creates the group first if it is not known to exist (one round trip, once).

        Raises:
            ValueError: ``count`` < 1.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.ensure_group(topic, group)
        k, a = SkipTrimmedKeys.of(topic), SkipTrimmedArgs(group=group, topic=topic)
        pipe.execute_command("EVAL", self._skip_trimmed.script.script, len(k), *k, *a)
        pipe.xreadgroup(group, consumer, {event_stream(topic): ">"}, count=count, block=block_ms)

    def take_poll(self, topic: str, group: str, consumer: str, lost, resp, count: int = 100,
                  block_ms: int | None = None) -> tuple[int, list[Delivery]]:
        """``poll``'s answer ``(entries lost, deliveries)`` from the two replies of
        :meth:`queue_poll` (as ``execute(raise_on_error=False)`` returns them). A missing group
        (the stream was deleted meanwhile) is recreated and read again with ``consume``.

        Raises:
            redis.RedisError: either reply is an error other than a missing group.
        """
        if isinstance(resp, redis.ResponseError) and "NOGROUP" in str(resp):
            # the stream or group was deleted meanwhile: consume() recreates it and reads again
            self._groups.discard((event_stream(topic), group))
            return int(lost or 0) if not isinstance(lost, Exception) else 0, self.consume(
                topic, group, consumer, count=count, block_ms=block_ms)
        for res in (lost, resp):
            if isinstance(res, Exception):
                raise res
        entries = resp[0][1] if resp else []
        return int(lost or 0), self._deliver(topic, group, [(_s(i), f, 1) for i, f in entries])

    def consume_own_pending(self, topic: str, group: str, consumer: str, count: int = 100) -> list[Delivery]:
        """All entries already delivered to ``consumer`` and not acknowledged (its own pending list,
        XREADGROUP from id ``0``), e.g. the batch in hand when the connection dropped or the process
        restarted under the same name. Entries trimmed meanwhile are dead-lettered, as in ``reclaim``;
        delivery counts come from XPENDING, so poison entries still end in the dead-letter stream.
        ``count`` is the page size of each read, not a cap: a consumer's pending list is at most
        what it read in a few batches (it acknowledges each batch; the stream processor's pipelined
        drain reads up to two ahead), so all of it is returned.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        self.ensure_group(topic, group)
        key, out, after = event_stream(topic), [], "0"
        while True:
            resp = self.client.xreadgroup(group, consumer, {key: after}, count=count)
            entries = resp[0][1] if resp else []
            if not entries:
                return out
            after = _s(entries[-1][0])
            live = []
            for i, f in entries:
                if f:
                    live.append((_s(i), f))
                else:
                    self._dead_letter(topic, group, _s(i), {}, "entry was trimmed from the stream (MAXLEN) "
                                      "before it was acknowledged; payload lost", ack=True)
            if live:
                pipe = self.client.pipeline(transaction=False)
                for i, _ in live:
                    pipe.xpending_range(key, group, min=i, max=i, count=1)
                counts = [int(r[0]["times_delivered"]) if r else 1 for r in pipe.execute()]
                out += self._deliver(topic, group, [(i, f, n) for (i, f), n in zip(live, counts)])

    def ack(self, delivery: Delivery) -> None:
        """XACK the delivery's id for its group."""
        self.client.xack(event_stream(delivery.topic), delivery.group, delivery.id)

    def ack_many(self, deliveries: list[Delivery]) -> None:
        """One XACK per (topic, group) for all their ids."""
        by_group: dict[tuple[str, str], list[str]] = {}
        for d in deliveries:
            by_group.setdefault((d.topic, d.group), []).append(d.id)
        for (topic, group), ids in by_group.items():
            self.client.xack(event_stream(topic), group, *ids)

    def backlog(self, topic: str, group: str) -> "Backlog":
        """``Backlog`` of ``group`` on ``topic`` from XINFO GROUPS (``lag`` needs Redis >= 7.0; it is
        ``None`` when Redis cannot compute it, e.g. after entries were deleted mid-stream) and the
        dead-letter stream's length. A group not created yet is behind by what it will read first:
        the whole stream (``group_start_id="0"``) or nothing (``"$"``)."""
        key = event_stream(topic)
        try:
            groups = self.client.xinfo_groups(key)
        except redis.ResponseError:  # no such stream yet
            groups = []
        lag = int(self.client.xlen(key)) if self.group_start_id == "0" else 0
        pending = 0
        for g in groups:
            if _s(g["name"]) == group:
                lag = g.get("lag")
                lag = None if lag is None else int(lag)
                pending = int(g["pending"])
        return Backlog(lag=lag, pending=pending, dead_letters=int(self.client.xlen(dead_letter_stream(topic))))

    def reclaim(self, topic: str, group: str, consumer: str, min_idle_ms: int,
                count: int = 100) -> list[Delivery]:
        """XAUTOCLAIM to ``consumer`` up to ``count`` entries of ``group`` idle >= ``min_idle_ms`` ms.

        Returns the valid ones as deliveries with their delivery count (read with XPENDING). Entries
        reclaimed more than ``max_deliveries`` times, invalid entries, and entries trimmed from the
        stream while pending go to the dead-letter stream instead.
        """
        if min_idle_ms < 0 or count < 1:
            raise ValueError(f"need min_idle_ms >= 0 and count >= 1, got {min_idle_ms}, {count}")
        self.ensure_group(topic, group)
        key = event_stream(topic)
        claimed: list[tuple[str, dict[bytes, bytes]]] = []
        trimmed: list[str] = []
        cursor = "0-0"
        while len(claimed) < count:
            try:
                resp = self.client.xautoclaim(key, group, consumer, min_idle_ms, start_id=cursor,
                                              count=count - len(claimed))
            except redis.ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # the stream or group was deleted since we created it: nothing is pending in it
                self._groups.discard((key, group))
                self.ensure_group(topic, group)
                return []
            cursor = _s(resp[0])
            for i, f in resp[1]:
                # Redis 6.2 returns a trimmed entry with nil fields; 7.x lists its id in resp[2]
                # (and has already removed it from the pending list).
                if f:
                    claimed.append((_s(i), f))
                else:
                    trimmed.append(_s(i))
            if len(resp) > 2:
                trimmed.extend(_s(i) for i in resp[2])
            if cursor == "0-0":
                break
        for entry_id in trimmed:
            # ack too: 7.x already dropped the id from the pending list, 6.2 keeps it there
            self._dead_letter(topic, group, entry_id, {},
                              "entry was trimmed from the stream (MAXLEN) before it was acknowledged; payload lost",
                              ack=True)
        if not claimed:
            return []
        pipe = self.client.pipeline(transaction=False)
        for entry_id, _ in claimed:
            pipe.xpending_range(key, group, min=entry_id, max=entry_id, count=1)
        counts = []
        for rows in pipe.execute():
            counts.append(int(rows[0]["times_delivered"]) if rows else 1)
        return self._deliver(topic, group, [(i, f, n) for (i, f), n in zip(claimed, counts)])

    def skip_trimmed(self, topic: str, group: str) -> int:
        """Detect entries trimmed (``MAXLEN``) before ``group`` read them, e.g. while its consumers
        were down longer than the stream's retention: write one dead letter naming the gap (the
        payloads are gone) and correct the group's read counter (``XGROUP SETID ... ENTRIESREAD``,
        else its lag stays inflated), atomically in one script. Returns the number of entries lost
        (0 if none, on Redis < 7.0, or when Redis cannot count what the group read, e.g. after XDEL).
        Call it before each read: once the group reads past the gap it can no longer be counted.
        """
        self.ensure_group(topic, group)
        lost = self._skip_trimmed(SkipTrimmedKeys.of(topic), SkipTrimmedArgs(group=group, topic=topic))
        return int(lost or 0)

    def applied_until(self, topic: str, group: str) -> float | None:
        """``EventBus.applied_until`` from the group's state, read atomically in one script
        (``applied_until.lua``: XINFO GROUPS for the last-delivered id, XRANGE for the oldest entry
        after it, XPENDING's O(1) range form for the oldest pending one, TIME): ``min(now, oldest
        undelivered, oldest pending)`` in s with ms precision (stream ids are Redis ms). Entries
        trimmed before delivery are not waited for (``skip_trimmed`` reports them). ``None`` if
        the stream or group does not exist (nothing is created).
        """
        ms = self._applied_until(AppliedUntilKeys(stream=event_stream(topic)), AppliedUntilArgs(group=group))
        return None if ms is None else int(ms) / 1000

    # ---- dead letters ----
    def dead_letter(self, delivery: Delivery, reason: str) -> str:
        """Write ``delivery`` (reason, original topic / id / group, original fields) to
        the topic's dead-letter stream and XACK it, in one MULTI transaction; returns the dead-letter id.

        Use it when the consumer cannot process a valid event (say, it references an unknown post)
        and retrying will not help.
        """
        if not reason:
            raise ValueError("a dead letter needs a reason")
        return self._dead_letter(delivery.topic, delivery.group, delivery.id, delivery.fields, reason, ack=True)

    def dead_letters(self, topic: str, count: int = 1000) -> list[DeadLetter]:
        """The oldest ``count`` entries of the topic's dead-letter stream, decoded."""
        out = []
        for dl_id, f in self.client.xrange(dead_letter_stream(topic), count=count):
            orig = {k[len(b"orig:"):]: v for k, v in f.items() if k.startswith(b"orig:")}
            out.append(DeadLetter(id=_s(dl_id), reason=_s(f[b"reason"]), original_topic=_s(f[b"original_topic"]),
                                  original_id=_s(f[b"original_id"]), group=_s(f[b"group"]), fields=orig))
        return out

    def _dead_letter(self, topic: str, group: str, entry_id: str, fields: dict[bytes, bytes], reason: str,
                     ack: bool) -> str:
        # Original fields are kept byte for byte under "orig:<name>" (they may not be UTF-8 or JSON).
        dl = {b"reason": reason.encode("utf-8"), b"original_topic": topic.encode(),
              b"original_id": entry_id.encode(), b"group": group.encode()}
        dl.update({b"orig:" + (k if isinstance(k, bytes) else str(k).encode()): v for k, v in fields.items()})
        pipe = self.client.pipeline(transaction=True)  # dead letter and ack together or not at all
        pipe.xadd(dead_letter_stream(topic), dl)
        if ack:
            pipe.xack(event_stream(topic), group, entry_id)
        return _s(pipe.execute()[0])

    def _deliver(self, topic: str, group: str, entries: list[tuple[str, dict[bytes, bytes], int]]) -> list[Delivery]:
        out = []
        for entry_id, fields, n in entries:
            if n > self.max_deliveries:
                reason = f"delivered {n} times (max_deliveries={self.max_deliveries}) without an ack"
                self._dead_letter(topic, group, entry_id, fields, reason, ack=True)
                continue
            try:
                event = parse_event(fields)
            except EventValidationError as exc:
                self._dead_letter(topic, group, entry_id, fields, f"invalid event: {exc.reason}", ack=True)
                continue
            out.append(Delivery(topic=topic, group=group, id=entry_id, event=event, fields=fields, delivery_count=n))
        return out


def run_consumer_loop(stop_event: threading.Event, own_pending: Callable[[], int], run_once: Callable[[], int],
                      name: str, retry_s: float = 1.0) -> int:
    """The loop of a consumer process (stream processor, fan-out worker): ``run_once`` until
    ``stop_event`` is set; returns the sum of what the calls returned. A ``redis.RedisError`` is
    logged and retried after ``retry_s``.

    At start and after every error it first calls ``own_pending`` (re-read what this consumer name
    read but did not acknowledge, e.g. the batch in hand when Redis went away or the process was
    restarted under the same name), which ``XREADGROUP >`` never returns and the reclaim would only
    take after its idle time.
    """
    total, resume = 0, True
    while not stop_event.is_set():
        try:
            if resume:
                total += own_pending()
                resume = False
            total += run_once()
        except redis.RedisError as exc:
            log.warning("%s: %s; retrying", name, exc)
            resume = True
            stop_event.wait(retry_s)
    return total
