"""The stream processor: engagement / social events -> real-time features in Redis (the online store).

A batch's ``EngagementEvent`` events are applied by ONE Lua script call (``lua/engagement_batch.lua``,
laid out by ``scripts.EngagementBatchScript``; a run of engagements between two social events is
one call, at most ``MAX_BATCH_EVENTS`` events), atomic in Redis. The script folds the events into
each key's state in order, as one script per event did before, but reads and writes each key once
per call: a batch costs a few Redis commands per post, author and user, and two per event hour
(its idempotency set). It reads (and so type-checks) every key before its first write, since a
script is not rolled back on an error; a call that fails changes nothing and is retried one event
per call, so only the event whose write fails stays pending. Each applied event's id goes into the
idempotency set of its event hour (``online_layout.rt_seen_set``, expiring ``seen_ttl_s`` after
its last write): an event whose id is in it, or whose id an earlier
event of the same call had, changes nothing, so an event delivered twice (at-least-once bus,
reclaim after a crash, a partly applied batch delivered again) counts once. A social event is one
``lua/social.lua`` call (after the ``lua/guard.lua`` prelude), in order with the engagement calls in
the batch's pipeline. The bus entry is acknowledged only with or after its write: when the bus is
Redis Streams on this same Redis, a run of engagements acknowledges its entries in its own script
(write and XACK one atomic step), else (and for social events) one XACK follows the pipeline; a
crash in between leaves those entries pending with their ids marked applied, and their redelivery is
a no-op. A failed write leaves its entry pending, and a processor reclaims entries idle for
``reclaim_idle_ms`` when it starts and every ``reclaim_every_s`` after. A batch is two round trips
when all goes well: ``EventBus.poll`` (the trimmed-entries check and the read) and the write. While
the group has a backlog, ``run`` drains it pipelined (``StreamProcessor._drain_pipelined``): each
round trip carries one batch's writes and the read of a later batch, two are in flight on one
connection, and the next batch is parsed and laid out while Redis runs the scripts, so the
processor's Python and Redis work overlap instead of taking turns (batches written one after the
other, in stream order: the same effects). Key
layout: ``core/online_layout.py``; window / decay math: ``core/realtime.py``; the reader:
``mixer.feature_hydrators.realtime_reader``.

Liveness stamp (``caught_up`` in ``online_layout.RT_COVERAGE``), which the mixer compares with the
Redis server's clock to tell a live stream from a stopped or overloaded one: a batch (at most every
``stamp_every_s``) asks the bus ``applied_until(topic, group)``, the time before which the group has
acknowledged every entry (applied or dead-lettered; read atomically by the bus, on the Redis clock:
stream ids are Redis ms, so neither the processor's nor the mixer's clock enters), *before* the
batch's writes and their XACK: the batch is still pending, so the stamp claims only what preceded
it, and a failed write keeps it there until it succeeds. The value is written in the batch's
pipeline by ``lua/coverage_stamp.lua``, atomically on the online store's Redis clock: it only moves
forward (processors of a group stamp concurrently, each with a value that was true when read), but
a stored value ahead of the server clock (a clock step back, a failover) is replaced. The bus and
the online store must be one Redis (or share a clock): the mixer compares the bus's time with the
online store's. One field for the database: run one processor group (one topic) per online store.
Entries trimmed before delivery are not waited for (``EventBus.skip_trimmed`` reports them).

``PostCreatedEvent`` entries are acknowledged without a write (the candidate index owns posts; the
fan-out workers, ``pipelines.graph.fanout``, consume them in a group of their own). With a
``SocialGraphWriter`` a social event also updates the social graph in the same pipeline
(``graph_edge.lua``, one single-slot half per user), and a follow then backfills the followee's recent
posts into the follower's home timeline (one more round trip per batch).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import socket
import threading
import time
from typing import Callable

import numpy as np
import redis

from core import online_layout as keys
from core import realtime
from pipelines.graph.writer import SocialGraphWriter
from pipelines.streaming.bus import Delivery, EventBus, RedisStreamsBus, run_consumer_loop
from pipelines.streaming.events import EngagementEvent, SocialGraphEvent
from pipelines.streaming.metrics import StreamMetrics
from pipelines.streaming.scripts import (
    COVERAGE_STAMP, SOCIAL, CoverageStampArgs, CoverageStampKeys, EngagementBatchScript, SocialArgs, SocialKeys,
)

log = logging.getLogger(__name__)

# Engagement events per engagement_batch.lua call: bounds one script's run time (~10 us per event)
# and the lists it unpacks; a larger read is several calls in the same pipeline.
MAX_BATCH_EVENTS = 1000
_OUTCOMES = {0: "duplicate", 1: "applied"}  # script replies; social.lua's 2 is "stale"


@dataclasses.dataclass
class _PreparedWrite:
    """A batch's writes laid out on a pipeline not yet sent (``StreamProcessor._prepare``) and what
    reading their replies needs (``_finish``)."""

    pipe: object
    events: list
    ack_ids: list[str] | None  # the entries the scripts acknowledge, or None
    steps: list[tuple]
    event_s: list[float]
    write_ts: float
    stamp: bool
    reset_coverage: bool
    sends: bool  # anything queued (else the pipeline need not be sent)
    deliveries: list = dataclasses.field(default_factory=list)


class _SentPipeline:
    """A non-transactional redis-py pipeline sent now on ``conn`` and its replies read later:
    redis-py's ``Pipeline._execute_pipeline`` in two halves, so the caller can do other work while
    Redis runs the commands. ``conn`` is a connection the caller holds: pipelines sent on it run in
    the order sent, and their replies are read in that order. No retry: a connection error raises
    (from the send or from :meth:`replies`) and the connection is dropped (the caller gives it
    back)."""

    def __init__(self, pipe, conn):
        if pipe.scripts:  # redis-py Script calls queued (social.lua, the stamp): loaded as execute() does
            pipe.load_scripts()
        self.pipe, self.commands, self.conn = pipe, list(pipe.command_stack), conn
        try:
            conn.send_packed_command(conn.pack_commands([args for args, _ in self.commands]))
        except BaseException:
            conn.disconnect()
            raise

    def close(self) -> None:
        """Drop the replies unread (after an error elsewhere): the connection is disconnected,
        since unread replies would answer its next user's commands."""
        if self.conn is not None:
            self.conn.disconnect()
            self.pipe.reset()
            self.conn = None

    def replies(self) -> list:
        """The replies in command order, a ``redis.ResponseError`` in place of a failed command's
        (``execute(raise_on_error=False)``)."""
        out: list = []
        try:
            for args, options in self.commands:
                try:
                    out.append(self.pipe.parse_response(self.conn, args[0], **options))
                except redis.ResponseError as exc:
                    out.append(exc)
        except BaseException:
            self.conn.disconnect()  # replies left unread: the connection cannot be reused
            raise
        finally:
            self.pipe.reset()
            self.conn = None
        return out


def _reset_coverage(target) -> None:
    """The coverage reset after entries were lost (``StreamProcessor._lost``): ``since`` and
    ``first`` restart at the next event applied. ``target``: the online store's client (now) or a
    pipeline (in order with its writes)."""
    target.hdel(keys.RT_COVERAGE, "since", "first")


def _same_server(a: redis.Redis, b: redis.Redis) -> bool:
    """Whether two clients reach the same Redis database: the same client, or the same host,
    port, unix socket and db (a name and its address count as different: the answer errs on no)."""
    if a is b:
        return True
    ka, kb = a.get_connection_kwargs(), b.get_connection_kwargs()
    return all(ka.get(f) == kb.get(f) for f in ("host", "port", "path", "db"))


class StreamProcessor:
    """Consumes ``topic`` as ``consumer`` of ``group`` and writes real-time features.

    A batch of deliveries is written in one pipeline (one ``engagement_batch.lua`` EVALSHA per run
    of engagement events, one ``social.lua`` per social event; each call atomic on its own) and
    acknowledged with one XACK for the events whose write succeeded. When the bus is a
    ``RedisStreamsBus`` on the online store's own Redis, a run's XACK is the last command of its
    script instead: its writes and its acknowledgement are one atomic step, and the batch needs
    one round trip fewer (Kafka Streams' exactly-once commits the offsets in the state's
    transaction likewise); the social events keep the separate XACK. A failed engagement call
    wrote (and acknowledged) nothing and is retried one event per call in a second round trip.

    Args:
        client: ``redis.Redis`` of the online store (any ``decode_responses``).
        bus: the event bus (``RedisStreamsBus``).
        consumer: this process's consumer name (default ``<host>-<pid>``); unique per live process.
        reclaim_idle_ms: entries pending this long (ms) in the group are assumed orphaned by a
            crashed consumer and taken over.
        reclaim_every_s: ``run`` reclaims again after this many seconds.
        seen_ttl_s: lifetime of the idempotency marker (s); a redelivery later than this is applied again.
        clock: wall clock (epoch s) for write times and lag; injectable for tests.
        lag_window: how many recent lags ``lag_percentiles`` keeps.
        metrics: where to export Prometheus metrics (``StreamMetrics``; default a private registry).
        backlog_every_s: ``run`` refreshes the consumer-lag gauges this often.
        stamp_every_s: batches write the liveness stamp (module docstring: one ``applied_until``
            round trip to the bus + ``coverage_stamp.lua`` in the batch's pipeline) at most this
            often (s); the mixer's staleness limit is tens of seconds.
        graph: keeps the social graph (``pipelines.graph.SocialGraphWriter``: followers and
            followees of every follow / unfollow / block, and the follow backfill of home
            timelines) beside ``social.lua``'s sets; ``None`` leaves the graph alone.

    Raises:
        ValueError: a negative ``reclaim_idle_ms`` / ``stamp_every_s`` or a non-positive ttl / window.
    """

    def __init__(self, client: redis.Redis, bus: EventBus, topic: str = "engagements",
                 group: str = "feature-writer", consumer: str | None = None, reclaim_idle_ms: int = 30_000,
                 reclaim_every_s: float = 30.0, seen_ttl_s: int = realtime.SEEN_TTL_S,
                 clock: Callable[[], float] = time.time, lag_window: int = 10_000,
                 metrics: StreamMetrics | None = None, backlog_every_s: float = 1.0,
                 stamp_every_s: float = 0.1, graph: "SocialGraphWriter | None" = None):
        if reclaim_idle_ms < 0 or seen_ttl_s < 1 or lag_window < 1 or stamp_every_s < 0:
            raise ValueError("need reclaim_idle_ms >= 0, seen_ttl_s >= 1, lag_window >= 1, stamp_every_s >= 0")
        self.client, self.bus, self.topic, self.group = client, bus, topic, group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.reclaim_idle_ms, self.reclaim_every_s, self.seen_ttl_s = reclaim_idle_ms, reclaim_every_s, seen_ttl_s
        self.clock = clock
        self.metrics = metrics or StreamMetrics()
        self.backlog_every_s, self.stamp_every_s = backlog_every_s, stamp_every_s
        self.graph = graph
        self._last_stamp = -math.inf
        self._batch = EngagementBatchScript(client)
        # the XACK of a run of engagements inside its script: only on the bus's own server
        # (never on a Redis Cluster: the stream's slot is not the batch's; the XACK follows the writes)
        self._ack_in_script = (isinstance(bus, RedisStreamsBus) and not self._batch.cluster
                               and _same_server(bus.client, client))
        self._stream_key = keys.event_stream(topic)
        self._social = SOCIAL.register(client)
        self._stamp = COVERAGE_STAMP.register(client)
        self._stamp_keys = CoverageStampKeys()
        self._lags: collections.deque[float] = collections.deque(maxlen=lag_window)
        self._last_reclaim: float | None = None
        self._last_backlog = -math.inf
        self._outcome_counters: dict = {}
        self._lag_histogram = self.metrics.lag.labels(topic=topic)
        self.stats = collections.Counter()  # applied, duplicate, stale, skipped, failed, lost
        self._unobserved: list[float] | None = None  # lags the pipelined drain has yet to put in the histogram
        self._coverage_reset_due = False  # see _drain_pipelined's error path

    # ---- applying events ----
    def _call(self, event, client) -> int:
        """Queue (on a pipeline) a non-engagement event's scripts; returns how many were queued (0:
        the event needs no write; a social event with a graph writer queues social.lua and the
        graph's two halves, ``SocialGraphWriter.queue``)."""
        if isinstance(event, SocialGraphEvent):
            self._social(SocialKeys.of(event.event_id, event.user_id),
                         SocialArgs(seen_ttl=self.seen_ttl_s, action=event.action, author_id=event.author_id,
                                    event_ts=f"{event.event_ts.timestamp():.6f}"), client=client)
            return 1 + (self.graph.queue(event, client) if self.graph is not None else 0)
        return 0

    def _record(self, results: list, event_s: list, done_ts: float) -> list[bool | Exception]:
        """Count each event's outcome (``stats``, ``events_total``) and the lag (``done_ts`` - event
        time) of the applied ones; returns ``apply_many``'s list. ``results[i]`` is the script's
        reply (0 / 1 / 2), an exception, or ``None`` (no write needed); ``event_s[i]`` the event's
        time (epoch s)."""
        counts = collections.Counter()
        out: list[bool | Exception] = []
        lags = []
        for res, t in zip(results, event_s):
            if res is None:
                counts["skipped"] += 1
                out.append(False)
            elif isinstance(res, Exception):
                counts["failed"] += 1
                out.append(res)
            else:
                outcome = _OUTCOMES.get(int(res), "stale")
                counts[outcome] += 1
                if outcome == "applied":
                    lags.append(done_ts - t)
                out.append(outcome == "applied")
        for outcome, n in counts.items():
            self._count(outcome, n)
        if lags:
            self._lags.extend(lags)
            if self._unobserved is not None:  # a pipelined drain observes them while Redis works
                self._unobserved += lags
            else:
                self._observe(lags)
        return out

    def _observe(self, lags: list[float]) -> None:
        observe = self._lag_histogram.observe
        for lag in lags:
            observe(lag if lag > 0.0 else 0.0)

    def _count(self, outcome: str, n: int) -> None:
        self.stats[outcome] += n
        counter = self._outcome_counters.get(outcome)
        if counter is None:  # labels() costs ~2.5 us: resolve each child once
            counter = self._outcome_counters[outcome] = self.metrics.events.labels(topic=self.topic, outcome=outcome)
        counter.inc(n)

    def apply(self, event) -> bool:
        """Write one event's features atomically; ``True`` if applied now, ``False`` if it was a
        duplicate (already applied) or needs no write. Raises ``redis.RedisError`` on a failed write."""
        return self.apply_many([event])[0]

    def apply_many(self, events: list) -> list[bool | Exception]:
        """Write several events in one pipeline (see the class; runs of engagement events are one
        atomic script call each).

        Returns per event ``True`` (applied now), ``False`` (duplicate, stale or no write needed) or
        the ``redis.RedisError`` its write raised (nothing of that event was written).

        Raises:
            redis.RedisError: the round trip itself failed (connection lost): events before the
                failure may have been applied, which is safe since a retry is idempotent.
        """
        return self._write(events, stamp=False)[0]

    def _applied_until(self) -> float | None:
        """The bus's ``applied_until`` for the liveness stamp; ``None`` (logged: the mixer will
        judge the stream stale, say why here) if the group does not exist or the read failed."""
        try:
            caught_up = self.bus.applied_until(self.topic, self.group)
        except redis.RedisError as exc:
            log.warning("liveness stamp of %s / %s failed: %s", self.topic, self.group, exc)
            return None
        if caught_up is None:
            log.warning("liveness stamp of %s / %s failed: no such stream or group on the bus", self.topic,
                        self.group)
        return caught_up

    def _write(self, events: list, stamp: bool, ids: list[str] | None = None
               ) -> tuple[list[bool | Exception], list[bool]]:
        """Write ``events`` (see ``apply_many``); with ``ids`` (their stream entries) and the bus on
        this Redis, each engagement run's script also acknowledges its entries. Returns
        ``apply_many``'s list and, per event, whether it was acknowledged here."""
        prep = self._prepare(events, stamp, ids)
        return self._finish(prep, self._execute(prep))

    def _execute(self, prep: "_PreparedWrite"):
        """Send ``prep``'s pipeline and wait: an iterator over its replies (errors in place)."""
        try:
            return iter(prep.pipe.execute(raise_on_error=False) if prep.sends else [])
        except redis.RedisError:
            self._batch.discard()
            raise

    def _prepare(self, events: list, stamp: bool, ids: list[str] | None = None,
                 reset_coverage: bool = False) -> "_PreparedWrite":
        """Lay out the writes of ``events`` on a new pipeline, not sent: ``_write``'s first half
        (``_finish`` reads the replies). With ``reset_coverage`` the pipeline starts with the
        coverage reset of entries lost before these events (``_lost``)."""
        write_ts = self.clock()
        ack = ids is not None and self._ack_in_script
        # before the writes and their XACK: this batch is still pending, so the stamp claims only
        # what preceded it (a failed write keeps it there until it succeeds); module docstring
        caught_up = self._applied_until() if stamp else None
        stamp = caught_up is not None
        pipe = self.client.pipeline(transaction=False)
        if reset_coverage:
            _reset_coverage(pipe)
        # steps in event order: (start, stop) of a run of engagements (one script call), or
        # (i, None, queued) for one other event
        steps: list[tuple] = []
        event_s = [0.0] * len(events)

        def queue_run(start: int, stop: int) -> None:
            event_s[start:stop] = self._batch.queue(
                pipe, events[start:stop], write_ts, self.seen_ttl_s,
                (self._stream_key, self.group, ids[start:stop]) if ack else None)
            steps.append((start, stop))

        run_start = None
        for i, e in enumerate(events):
            if isinstance(e, EngagementEvent):
                if run_start is None:
                    run_start = i
                if i + 1 - run_start == MAX_BATCH_EVENTS:
                    queue_run(run_start, i + 1)
                    run_start = None
                continue
            if run_start is not None:
                queue_run(run_start, i)
                run_start = None
            steps.append((i, None, self._call(e, pipe)))
        if run_start is not None:
            queue_run(run_start, len(events))
        if stamp:
            self._stamp(self._stamp_keys, CoverageStampArgs(caught_up=f"{caught_up:.3f}"), client=pipe)
        sends = reset_coverage or stamp or any(len(st) == 2 or st[2] for st in steps)
        return _PreparedWrite(pipe, events, ids if ack else None, steps, event_s, write_ts, stamp,
                              reset_coverage, sends)

    def _finish(self, prep: "_PreparedWrite", replies) -> tuple[list[bool | Exception], list[bool]]:
        """``_write``'s second half: take ``prep``'s replies from the iterator ``replies`` (in the
        order ``_prepare`` queued them; the iterator may go on with other commands' replies), retry
        failed engagement runs one event per call, backfill follows, count the outcomes."""
        events, steps, event_s, ack_ids = prep.events, prep.steps, prep.event_s, prep.ack_ids
        if prep.reset_coverage:
            res = next(replies)
            if isinstance(res, Exception):
                log.warning("coverage reset of %s failed: %s", self.topic, res)
        results: list = [None] * len(events)  # per event: reply, exception, or None (no write)
        acked = [False] * len(events)
        graph_ok: list[int] = []  # follows whose social and graph writes succeeded (backfill)
        retry: list[tuple[int, int, Exception]] = []
        for st in steps:
            if len(st) == 2:
                start, stop = st
                res = self._batch.take(replies)
                if isinstance(res, Exception):
                    retry.append((start, stop, res))  # the call changed nothing: try its events one by one
                elif len(res) != stop - start:
                    raise RuntimeError(f"engagement_batch.lua answered {len(res)} results for {stop - start} events")
                else:
                    results[start:stop] = res
                    acked[start:stop] = [ack_ids is not None] * (stop - start)
                continue
            i, _, q = st
            if not q:
                continue
            res, *graph = [next(replies) for _ in range(q)]
            # the graph's halves are idempotent on their own: a failed one leaves the entry
            # pending, and the retry applies only what is missing
            results[i] = next((r for r in (res, *graph) if isinstance(r, Exception)), res)
            event = events[i]
            event_s[i] = event.event_ts.timestamp()
            if self.graph is not None and event.action == "follow" and not isinstance(results[i], Exception):
                graph_ok.append(i)
        if prep.stamp:
            res = next(replies)
            if isinstance(res, Exception):
                # the mixer will judge the stream stale: say why here
                log.warning("liveness stamp of %s / %s failed: %s", self.topic, self.group, res)
        if retry:
            self._retry_one_by_one(events, retry, results, prep.write_ts, ack_ids, acked)
        done_ts = self.clock()  # the writes are visible to readers from here: the lag's end
        # a follow's backfill reads the followee's posts: a second round trip, after the edges
        if graph_ok:
            for i, exc in self._backfill(events, graph_ok).items():
                results[i] = exc
        return self._record(results, event_s, done_ts), acked

    def _retry_one_by_one(self, events: list, runs: list[tuple[int, int, Exception]], results: list,
                          write_ts: float, ids: list[str] | None, acked: list[bool]) -> None:
        """Apply the events of failed ``engagement_batch.lua`` calls (``runs``: (start, stop) into
        ``events`` and the call's error; each changed nothing) one event per call, in one more round
        trip, and put each reply (or error) in ``results`` (and, with ``ids``, acknowledge each
        event in its call: ``acked``): only an event whose own write fails stays failed. The
        script is loaded again first: a ``NoScriptError`` (the server restarted or flushed its
        scripts) is one way a call fails.

        Raises:
            redis.RedisError: the round trip itself failed (the events stay pending).
        """
        for start, stop, exc in runs:
            if not isinstance(exc, redis.exceptions.NoScriptError):
                log.warning("engagement batch of %d events failed (%s); retrying them one by one", stop - start, exc)
        self._batch.load()
        pipe = self.client.pipeline(transaction=False)
        for start, stop, _ in runs:
            for i in range(start, stop):
                self._batch.queue(pipe, [events[i]], write_ts, self.seen_ttl_s,
                                  None if ids is None else (self._stream_key, self.group, [ids[i]]))
        try:
            replies = iter(pipe.execute(raise_on_error=False))
        except redis.RedisError:
            self._batch.discard()
            raise
        for start, stop, _ in runs:
            for i in range(start, stop):
                res = self._batch.take(replies)
                results[i] = res if isinstance(res, Exception) else res[0]
                acked[i] = ids is not None and not isinstance(res, Exception)

    def _backfill(self, events: list, follows: list[int]) -> dict[int, Exception]:
        """Backfill the followee's recent posts for the follows at ``follows`` (indexes into
        ``events`` whose social and graph writes succeeded; ``SocialGraphWriter.backfill``,
        idempotent: ZADD); returns event index -> the error for the follows whose backfill failed
        (left pending, retried)."""
        try:
            self.graph.backfill([(events[i].user_id, events[i].author_id) for i in follows])
        except redis.RedisError as exc:
            return {i: exc for i in follows}
        return {}

    # ---- consuming ----
    def _process(self, deliveries: list[Delivery]) -> int:
        """Write ``deliveries`` with the liveness stamp (if ``stamp_every_s`` has passed; module
        docstring) in one pipeline, then XACK the ones written that their script did not
        acknowledge itself (the class); an empty batch writes the stamp alone (an idle processor
        stays live)."""
        prep = self._process_prepare(deliveries)
        applied = self._process_finish(prep, self._execute(prep))
        if self._coverage_reset_due:  # a gap a failed pipelined drain could not reset in order
            _reset_coverage(self.client)
            self._coverage_reset_due = False
        return applied

    def _process_prepare(self, deliveries: list[Delivery], reset_coverage: bool = False) -> "_PreparedWrite":
        """``_process``'s first half: the stamp decision and ``_prepare`` of the deliveries' events."""
        now = time.monotonic()
        stamp = now - self._last_stamp >= self.stamp_every_s
        if stamp:
            self._last_stamp = now
        prep = self._prepare([d.event for d in deliveries], stamp=stamp, ids=[d.id for d in deliveries],
                             reset_coverage=reset_coverage)
        prep.deliveries = deliveries
        return prep

    def _process_finish(self, prep: "_PreparedWrite", replies) -> int:
        """``_process``'s second half: ``_finish``, then one XACK of the entries written that their
        script did not acknowledge; returns the events applied now."""
        results, acked = self._finish(prep, replies)
        done = []
        for d, res, was_acked in zip(prep.deliveries, results, acked):
            if isinstance(res, Exception):
                # No ack: the entry stays pending and is reclaimed later (or dead-lettered after
                # max_deliveries by the bus).
                log.warning("write failed for %s %s: %s; left pending", self.topic, d.id, res)
            elif not was_acked:
                done.append(d)
        if done:
            self.bus.ack_many(done)
        return sum(r is True for r in results)

    def _drain_pipelined(self, got: list[Delivery], count: int, budget_s: float) -> int:
        """Apply ``got`` (a full batch: the group is behind) and go on reading and applying while
        the stream has a backlog, for about ``budget_s`` s, with the next batch's Python work
        (event parsing, script layout) done while Redis runs the previous batch's script: the two
        overlap on two cores instead of taking turns. Returns the events applied now.

        Each pipeline is one batch's writes (as ``_process``: the scripts acknowledge their
        entries) followed by reads (``EventBus.queue_poll``) of later batches, so that a batch read
        earlier is parsed and laid out while Redis runs a pipeline (``_SentPipeline``). Two
        pipelines are in flight on one connection: Redis runs them in the order sent, one after
        the other, and the newer waits in the socket while this thread reads the older one's
        replies and lays out and sends the next; Redis does not sit idle between batches. The
        batches are written in stream order, so the effects, the idempotency and the crash
        guarantees are those of ``run_once``: a batch is written and acknowledged in one script,
        the batches read ahead stay pending with this consumer (``consume_own_pending`` / the
        reclaim take them after a crash). One difference: a batch whose script call failed (a key
        of another type; ``_retry_one_by_one``) has its events retried after the batch sent
        behind it, not before. Reads stop when
        one comes back short (caught up) or the budget is spent; the batches read by then are
        applied before returning. Entries lost to trimming reset the coverage in the pipeline of
        the batch read after them, after the writes of every batch before the gap.

        Needs the bus to be ``RedisStreamsBus`` on this Redis (``_ack_in_script``).

        Raises:
            redis.RedisError: a pipeline failed as a whole (the batches in hand stay pending).
        """
        deadline = time.monotonic() + budget_s
        reading = True
        ahead: collections.deque = collections.deque()  # poll replies (lost, resp) read, not yet parsed
        lost_unprepared = False  # a gap seen whose batch (carrying the coverage reset) is not laid out

        def take(raw) -> "_PreparedWrite | None":
            nonlocal reading, lost_unprepared
            lost, batch = self.bus.take_poll(self.topic, self.group, self.consumer, *raw, count=count)
            if len(batch) < count or time.monotonic() >= deadline:
                reading = False  # caught up (or out of time): read no further
            if lost:
                self._lost(lost, reset_now=False)  # reset in this batch's pipeline, after the earlier writes
                lost_unprepared = True
            prepared = self._process_prepare(batch, reset_coverage=bool(lost)) if batch or lost else None
            lost_unprepared = False
            return prepared

        def next_batch() -> "_PreparedWrite | None":
            nxt = None
            while nxt is None and ahead:  # an empty read: the ones behind it may still hold entries
                nxt = take(ahead.popleft())
            return nxt

        # Two pipelines in flight on one connection: Redis runs them in the order sent, and while it
        # runs the older one the newer waits in its socket, so Redis does not sit idle while this
        # thread reads a reply, counts the outcomes and sends the next pipeline.
        conn = self.client.connection_pool.get_connection()
        # a health check would send a PING on a connection whose replies are still unread and take
        # the older pipeline's first reply for its answer: none on this connection while it is ours
        health_check_interval, conn.health_check_interval = conn.health_check_interval, 0
        inflight: collections.deque = collections.deque()  # (prep, sent or None, reads queued in it)
        reads_in_flight = 0
        applied, prep, finishing = 0, self._process_prepare(got), None
        self._unobserved = []  # lags go to the histogram while Redis runs the next pipeline
        try:
            while prep is not None or inflight:
                # a batch after a gap is sent alone: its coverage reset must follow every write of
                # the batches before the gap, including a failed one's retry (_retry_one_by_one,
                # which runs after the replies of its own pipeline are read)
                if prep is not None and not (prep.reset_coverage and inflight):
                    n_reads = max(0, 2 - len(ahead) - reads_in_flight) if reading else 0
                    for _ in range(n_reads):
                        self.bus.queue_poll(prep.pipe, self.topic, self.group, self.consumer, count)
                    sent = _SentPipeline(prep.pipe, conn) if prep.sends or n_reads else None
                    inflight.append((prep, sent, n_reads))
                    reads_in_flight += n_reads
                    # meanwhile (Redis runs the scripts): the previous batches' lags observed and,
                    # with one pipeline in flight only, the next batch read earlier laid out and sent
                    lags, self._unobserved = self._unobserved, []
                    self._observe(lags)
                    prep = next_batch() if len(inflight) < 2 else None
                    if prep is not None:
                        continue
                old, sent, n_reads = inflight.popleft()
                finishing = old  # its reset may not have run until its replies are read
                replies = iter(sent.replies() if sent is not None else [])
                applied += self._process_finish(old, replies)
                finishing = None
                for _ in range(n_reads):
                    ahead.append((next(replies), next(replies)))
                reads_in_flight -= n_reads
                if prep is None:
                    prep = next_batch()
        except BaseException:
            # the batches in hand stay pending (re-read after the error); the connection with
            # replies unread is dropped. A gap seen (or read and not yet parsed) whose queued reset
            # may not have run: the poll that found it moved the group past it, so no one would
            # report it again; the reset is due after the next batch this processor writes (run()
            # re-reads its pending entries first: coverage restarts after all of them)
            unparsed = sum(int(lost) for lost, _ in ahead if isinstance(lost, int))
            if unparsed:
                self._lost(unparsed, reset_now=False)
            unfinished = [p for p in (finishing, prep, *(q for q, _, _ in inflight)) if p is not None]
            self._coverage_reset_due |= (lost_unprepared or unparsed > 0
                                         or any(p.reset_coverage for p in unfinished))
            for _, unread, _ in inflight:
                if unread is not None:
                    unread.close()  # also resets its pipeline (a connection its script loading took)
            conn.disconnect()
            raise
        finally:
            conn.health_check_interval = health_check_interval
            self.client.connection_pool.release(conn)
            lags, self._unobserved = self._unobserved, None
            self._observe(lags)
        return applied

    def _lost(self, n: int, reset_now: bool = True) -> None:
        """``n`` entries were trimmed before the group read them: the stream's windows have a hole,
        so coverage restarts at the next event applied (the mixer takes the part of each window
        before it from the batch values). ``reset_now=False``: the caller queues the reset itself
        (``_prepare(reset_coverage=True)``) after the writes of the events before the gap."""
        log.error("%d %s entries were trimmed (MAXLEN) before group %s read them; their events are lost "
                  "(see the dead-letter stream). Raise the bus maxlen or keep the processors up; "
                  "real-time coverage restarts now", n, self.topic, self.group)
        self._count("lost", n)
        if reset_now:
            _reset_coverage(self.client)

    def reclaim(self, count: int = 100) -> int:
        """Take over and apply entries of the group pending >= ``reclaim_idle_ms``; returns events applied."""
        self._last_reclaim = self.clock()
        applied = 0
        while True:
            got = self.bus.reclaim(self.topic, self.group, self.consumer, self.reclaim_idle_ms, count=count)
            if not got:
                return applied
            applied += self._process(got)
            if len(got) < count:
                return applied

    def run_once(self, count: int = 100, block_ms: int | None = None, pipelined: bool = False) -> int:
        """Reclaim orphaned entries if due (always on the first call), then read up to ``count`` new
        entries (waiting up to ``block_ms`` ms; ``None`` = no wait) and apply them, with the liveness
        stamp (``caught_up`` of ``RT_COVERAGE``, module docstring; an idle processor stamps once per
        ``block_ms``, a busy one every ``stamp_every_s``), which the mixer reads to tell a live
        stream from a stopped or overloaded one.

        With ``pipelined`` and a full batch (the group is behind), it goes on with
        ``_drain_pipelined`` for up to ``backlog_every_s``: later batches' reads and Python work
        overlap the scripts of earlier ones (when the bus is Redis Streams on this Redis; else one
        batch, as without).

        Returns the number of events applied now (duplicates and post-created events excluded).
        """
        applied = 0
        if self._last_reclaim is None or self.clock() - self._last_reclaim >= self.reclaim_every_s:
            applied += self.reclaim(count)
        # the trimmed-entries check and the read in one round trip (EventBus.poll)
        lost, got = self.bus.poll(self.topic, self.group, self.consumer, count=count, block_ms=block_ms)
        if lost:
            self._lost(lost)
        if pipelined and self._ack_in_script and len(got) >= count:
            applied += self._drain_pipelined(got, count, budget_s=max(self.backlog_every_s, 0.1))
        else:
            applied += self._process(got)
        if time.monotonic() - self._last_backlog >= self.backlog_every_s:
            self.refresh_backlog()
        return applied

    def run(self, stop_event: threading.Event, count: int = 100, block_ms: int = 1000) -> int:
        """Loop ``run_once`` (pipelined while the group has a backlog) until ``stop_event`` is set
        (checked at least every ``block_ms`` ms, or every ``backlog_every_s`` while draining a
        backlog); returns the total events applied. A Redis error is logged and retried after a second.

        At start and after every error it first re-reads its own pending entries (what this
        consumer name read but did not acknowledge, e.g. the batch in hand when Redis went away),
        which ``XREADGROUP >`` never returns and the reclaim would only take after ``reclaim_idle_ms``.
        """
        return run_consumer_loop(
            stop_event, lambda: self._process(self.bus.consume_own_pending(self.topic, self.group, self.consumer, count)),
            lambda: self.run_once(count, block_ms, pipelined=True), "stream processor")

    def refresh_backlog(self):
        """Read the group's backlog from the bus into the consumer-lag gauges and set the lag
        p50/p99 gauges (a percentile over 10k samples costs ~0.3 ms: once per refresh, not per
        batch); returns the ``Backlog``."""
        self._last_backlog = time.monotonic()
        b = self.bus.backlog(self.topic, self.group)
        self.metrics.consumer_lag.labels(topic=self.topic, group=self.group).set(
            math.nan if b.lag is None else b.lag)
        self.metrics.pending.labels(topic=self.topic, group=self.group).set(b.pending)
        self.metrics.dead_letters.labels(topic=self.topic).set(b.dead_letters)
        self._publish_lag()
        return b

    def _publish_lag(self) -> None:
        p50, p99 = self.lag_percentiles()
        if not math.isnan(p50):
            self.metrics.lag_p50.labels(topic=self.topic).set(p50)
            self.metrics.lag_p99.labels(topic=self.topic).set(p99)

    def lag_percentiles(self) -> tuple[float, float]:
        """``(p50, p99)`` of event time -> the time its write returned (s; from then on readers see
        it) over the last ``lag_window`` applied events; ``(nan, nan)`` before any."""
        if not self._lags:
            return float("nan"), float("nan")
        p50, p99 = np.percentile(np.fromiter(self._lags, dtype=np.float64), [50, 99])
        return float(p50), float(p99)
