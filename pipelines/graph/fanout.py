"""Fan-out workers: post-created events -> followers' home timelines (push), celebrities skipped.

A worker is one consumer of the ``fanout.group`` consumer group on ``fanout.post_topic``; run
several (processes or machines) and the bus splits the posts between them. For each
``PostCreatedEvent`` of author A:

1. The post goes into A's own timeline (``user_posts``, capped), always.
2. If A has more than ``celebrity_threshold`` followers, A is listed in ``FANOUT_CELEBRITIES`` and
   that is all: the read path pulls A's latest posts (Twitter's hybrid: no million writes per
   celebrity post). A post of an author at or below the threshold takes A off the list.
3. Otherwise the worker reads A's followers in pages (``SSCAN``, ``page_size``) and, per page, one
   pipeline: ``ZADD`` of ``"post|author"`` -> created time into each follower's ``home_timeline``,
   ``ZREMRANGEBYRANK`` to keep the newest ``timeline_length``, then the post's checkpoint
   (``fanout_progress``: the ``SSCAN`` cursor of the next page).
4. When the last page is written the checkpoint says ``done`` and the bus entry is acknowledged.

Small posts are batched: most authors have fewer followers than one page (the median account on a
Twitter-like graph has about a dozen), so three round trips per post would cost more than its
writes. ``process`` reads the checkpoints and follower counts of a whole batch of posts in one
pipeline, the followers of the ones with at most ``page_size`` followers in a second, and writes all
their deliveries, each post's ``done`` mark after its own writes, in a third (Redis runs a pipeline
in order, so a ``done`` mark still means every write of its post is applied). Larger posts take the
paged path above.

Deletes: a ``PostDeletedEvent`` on the same topic is applied by ``delete``: a tombstone
(``DELETED_POSTS``, the first deletion time kept) and the post out of its author's timeline. Copies
already pushed stay in home timelines until a read drops them (``HomeTimelineReader``: lazy cleanup,
no fan-out of deletes); a post whose tombstone exists when its fan-out starts is not fanned out.

Nothing lost, nothing doubled: the entry is acknowledged only after the last page, so a worker
killed mid-post leaves it pending; another worker takes it over after ``reclaim_idle_ms``
(``XAUTOCLAIM``) or the same consumer re-reads its own pending list when it restarts, and resumes
at the checkpoint's cursor. Pages written after the checkpoint and before the kill are written again,
and ``ZADD`` of an existing member changes nothing (it returns 0, so ``deliveries_total`` counts
each timeline entry once). A post whose checkpoint says ``done`` (a redelivery after the ack was
lost) is acknowledged without writes. Followers added during a fan-out may or may not receive the
post (``SSCAN`` guarantees only members present for the whole scan); a follow backfills them.
Key layout: ``core.online_layout``; metrics: ``pipelines.graph.metrics``.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable

import redis

from core import online_layout as keys
from pipelines.graph.config import FanoutSettings
from pipelines.graph.metrics import FanoutMetrics
from pipelines.graph.store import SocialGraphStore
from pipelines.streaming.bus import Delivery, EventBus, run_consumer_loop
from pipelines.streaming.events import PostCreatedEvent, PostDeletedEvent

log = logging.getLogger(__name__)


def published_at(delivery: Delivery) -> float:
    """When ``delivery`` was appended to the bus (epoch s): the time part of its Redis stream id
    (``"<ms>-<seq>"``, the Redis server's clock)."""
    return int(delivery.id.split("-", 1)[0]) / 1000.0


@dataclass(frozen=True)
class FanoutResult:
    """What one post's fan-out did: ``outcome`` (``fanned_out`` | ``celebrity_skipped`` |
    ``duplicate`` | ``deleted``: deleted before its fan-out, nothing written), ``followers`` (the author's count when read), ``delivered`` (entries newly
    written by this call), ``pages`` written by this call, ``resumed_at`` (the cursor it started from:
    non-zero when it resumed a checkpoint)."""

    outcome: str
    followers: int
    delivered: int
    pages: int
    resumed_at: int


class FanoutWorker:
    """Consumes post-created events as ``consumer`` of ``settings.group`` and fans them out.

    Args:
        client: ``redis.Redis`` of the online store (the bus may share it).
        bus: the event bus (``RedisStreamsBus``).
        settings: the ``fanout:`` settings.
        consumer: this worker's consumer name (default ``<host>-<pid>``); unique per live worker.
        metrics: where to export Prometheus metrics (default a private registry).
        clock: wall clock (epoch s) for the lag; injectable for tests.
        reclaim_every_s: ``run`` looks for posts orphaned by crashed workers this often.
        backlog_every_s: ``run`` refreshes the backlog gauge this often.
    """

    def __init__(self, client: redis.Redis, bus: EventBus, settings: FanoutSettings | None = None,
                 consumer: str | None = None, metrics: FanoutMetrics | None = None,
                 clock: Callable[[], float] = time.time, reclaim_every_s: float = 5.0,
                 backlog_every_s: float = 1.0):
        self.client, self.bus = client, bus
        self.settings = settings or FanoutSettings()
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.metrics = metrics or FanoutMetrics()
        self.clock = clock
        self.reclaim_every_s, self.backlog_every_s = reclaim_every_s, backlog_every_s
        self.store = SocialGraphStore(client)
        self.stats = collections.Counter()
        self._last_reclaim = -float("inf")
        self._last_backlog = -float("inf")
        self._outcomes = {o: self.metrics.posts.labels(outcome=o)
                          for o in ("fanned_out", "celebrity_skipped", "duplicate", "deleted", "post_deleted",
                                    "failed")}

    # ---- one post ----
    def fan_out(self, event: PostCreatedEvent) -> FanoutResult:
        """Fan one post out (module docstring); safe to call again for the same post at any point.

        Raises:
            redis.RedisError: a failed read or write; the checkpoint holds what was done.
        """
        s, author = self.settings, event.author_id
        member = keys.encode_timeline_entry(event.post_id, author)
        created = event.event_ts.timestamp()
        progress = keys.fanout_progress(event.post_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.hgetall(progress)
        pipe.scard(keys.graph_followers(author))
        pipe.zscore(keys.DELETED_POSTS, str(event.post_id))
        state, followers, tombstone = pipe.execute()
        state = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in state.items()}
        if state.get("done"):
            return self._finish("duplicate", event, followers, 0, 0, 0)
        if tombstone is not None:
            self._mark_deleted(event)
            return self._finish("deleted", event, followers, 0, 0, 0)
        pipe = self.client.pipeline(transaction=False)
        self._queue_entry(pipe, keys.user_posts(author), member, created, s.user_posts_length)
        pipe.execute()
        if followers > s.celebrity_threshold:
            # the read path pulls the posts of the authors listed here
            self.client.pipeline(transaction=False).zadd(keys.FANOUT_CELEBRITIES, {str(author): followers}) \
                .hset(progress, mapping={"done": 1, "celebrity": 1}).expire(progress, s.progress_ttl_s).execute()
            return self._finish("celebrity_skipped", event, followers, 0, 0, 0)
        start = cursor = state.get("cursor", 0)
        delivered = pages = 0
        pause = s.page_pause_ms / 1000.0
        for cursor, page in self.store.follower_pages(author, s.page_size, cursor):
            pipe = self.client.pipeline(transaction=False)
            for follower in page:
                self._queue_entry(pipe, keys.home_timeline(follower), member, created, s.timeline_length)
            # the checkpoint comes last: Redis runs a pipeline in order, so a saved cursor means
            # every write of its page is applied
            pipe.hset(progress, "cursor", cursor)
            pipe.hincrby(progress, "pages", 1)
            pipe.expire(progress, s.progress_ttl_s)
            got = pipe.execute()
            new = sum(got[0:2 * len(page):2])  # ZADD: 1 = a new entry, 0 = written before
            delivered += new
            pages += 1
            self.metrics.deliveries.inc(new)
            if pause and cursor:
                time.sleep(pause)
        # pushed: not (or no longer, after falling below the threshold) an author to pull
        self.client.pipeline(transaction=False).zrem(keys.FANOUT_CELEBRITIES, str(author)) \
            .hset(progress, "done", 1).expire(progress, s.progress_ttl_s).execute()
        return self._finish("fanned_out", event, followers, delivered, pages, start)

    def _mark_deleted(self, event: PostCreatedEvent) -> None:
        """A post deleted before its fan-out: done, nothing written (a copy written to the author's
        timeline by a fan-out that raced the delete is removed)."""
        progress = keys.fanout_progress(event.post_id)
        self.client.pipeline(transaction=False) \
            .zrem(keys.user_posts(event.author_id), keys.encode_timeline_entry(event.post_id, event.author_id)) \
            .hset(progress, mapping={"done": 1, "deleted": 1}).expire(progress, self.settings.progress_ttl_s).execute()

    def delete(self, event: PostDeletedEvent) -> None:
        """Apply a delete (module docstring); idempotent (a redelivery changes nothing).

        Raises:
            redis.RedisError: the write failed; the event stays pending and is retried.
        """
        self.store.delete_post(event.post_id, event.author_id, deleted_at=event.event_ts.timestamp())
        self.stats["post_deleted"] += 1
        self._outcomes["post_deleted"].inc()

    def _finish(self, outcome: str, event: PostCreatedEvent, followers: int, delivered: int, pages: int,
                start: int) -> FanoutResult:
        self.stats[outcome] += 1
        self._outcomes[outcome].inc()
        if outcome not in ("duplicate", "deleted"):
            self.metrics.lag.observe(max(self.clock() - event.event_ts.timestamp(), 0.0))
        return FanoutResult(outcome, int(followers), delivered, pages, int(start))

    @staticmethod
    def _queue_entry(pipe, key: str, member: str, created: float, cap: int) -> None:
        """Two commands on ``pipe``: ``ZADD`` of the entry (1 = new, 0 = written before), then the cap."""
        pipe.zadd(key, {member: created})
        pipe.zremrangebyrank(key, 0, -cap - 1)

    def fan_out_small(self, events: list[PostCreatedEvent]) -> dict[str, FanoutResult]:
        """Fan out the posts of ``events`` whose authors have at most ``page_size`` followers and
        whose fan-out has not started, in three pipelines for all of them (module docstring).

        Returns:
            ``{event_id: FanoutResult}`` of the posts handled here; the others (celebrities, larger
            or half-done posts) are left to :meth:`fan_out`.

        Raises:
            redis.RedisError: a failed read or write; ``done`` marks say which posts completed.
        """
        s = self.settings
        pipe = self.client.pipeline(transaction=False)
        for e in events:
            pipe.hgetall(keys.fanout_progress(e.post_id))
            pipe.scard(keys.graph_followers(e.author_id))
            pipe.zscore(keys.DELETED_POSTS, str(e.post_id))
        got = pipe.execute()
        small, seen = [], set()
        for e, state, n, tombstone in zip(events, got[0::3], got[1::3], got[2::3]):
            # untouched, not deleted, not a celebrity's (fan_out handles those), one page
            if (not state and tombstone is None and 0 < n <= min(s.page_size, s.celebrity_threshold)
                    and e.post_id not in seen):
                small.append((e, int(n)))
                seen.add(e.post_id)  # a post delivered twice in the batch: the second is a duplicate
        if not small:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for e, _ in small:
            pipe.smembers(keys.graph_followers(e.author_id))
        followers = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        spans = []
        for (e, _), members in zip(small, followers):
            member, created = keys.encode_timeline_entry(e.post_id, e.author_id), e.event_ts.timestamp()
            self._queue_entry(pipe, keys.user_posts(e.author_id), member, created, s.user_posts_length)
            start = len(pipe)
            for f in members:
                self._queue_entry(pipe, keys.home_timeline(int(f)), member, created, s.timeline_length)
            spans.append((start, len(pipe)))
            progress = keys.fanout_progress(e.post_id)
            pipe.zrem(keys.FANOUT_CELEBRITIES, str(e.author_id))  # pushed: not an author to pull
            pipe.hset(progress, mapping={"done": 1, "pages": 1})  # after its writes (pipelines run in order)
            pipe.expire(progress, s.progress_ttl_s)
        got = pipe.execute()
        out = {}
        for (e, n), (a, b) in zip(small, spans):
            new = sum(got[a:b:2])  # ZADD: 1 = a new entry, 0 = written before
            self.metrics.deliveries.inc(new)
            out[e.event_id] = self._finish("fanned_out", e, n, new, 1, 0)
        return out

    # ---- consuming ----
    def process(self, deliveries: list[Delivery]) -> int:
        """Fan out each delivered post and acknowledge it; a post whose fan-out raised a Redis
        error stays pending (retried on reclaim). Other event types on the topic are acknowledged
        untouched. Small posts go through :meth:`fan_out_small` together, the rest one by one.
        Returns the posts handled (acknowledged)."""
        posts = [d for d in deliveries if isinstance(d.event, PostCreatedEvent)]
        # deletes first: a post created and deleted within one batch is then not fanned out
        deletes = [d for d in deliveries if isinstance(d.event, PostDeletedEvent)]
        applied = set()
        for d in deletes:
            try:
                self.delete(d.event)
                applied.add(d.id)
            except redis.RedisError as exc:
                log.warning("delete of post %s failed: %s; left pending", d.event.post_id, exc)
                self.stats["failed"] += 1
                self._outcomes["failed"].inc()
        batched: dict[str, FanoutResult] = {}
        if len(posts) > 1:
            try:
                batched = self.fan_out_small([d.event for d in posts])
            except redis.RedisError as exc:  # the posts whose done mark was written are skipped below
                log.warning("batched fan-out of %d posts failed: %s; one by one", len(posts), exc)
        done = []
        for d in deliveries:
            if isinstance(d.event, PostDeletedEvent):
                if d.id in applied:
                    self.bus.ack(d)
                    done.append(d)
                continue
            if not isinstance(d.event, PostCreatedEvent):
                self.bus.ack(d)  # not ours: nothing to do, and it must not stay pending
                done.append(d)
                continue
            if d.delivery_count > 1:
                self.metrics.retries.inc()
                self.stats["retries"] += 1
            try:
                # a second delivery of a batched post is a duplicate (pop)
                result = batched.pop(d.event.event_id, None) or self.fan_out(d.event)
            except redis.RedisError as exc:
                log.warning("fan-out of post %s failed: %s; left pending", d.event.post_id, exc)
                self.stats["failed"] += 1
                self._outcomes["failed"].inc()
                continue
            # ack each post as soon as it is done: a kill later in the batch must not redo it
            self.bus.ack(d)
            done.append(d)
            if result.outcome in ("fanned_out", "celebrity_skipped"):
                self.metrics.delivery_lag.observe(max(self.clock() - published_at(d), 0.0))
        return len(done)

    def run_once(self, count: int = 50, block_ms: int | None = None) -> int:
        """Reclaim posts orphaned by crashed workers (if due), then read up to ``count`` new ones
        (waiting up to ``block_ms``) and fan them out; returns the posts handled."""
        s, n = self.settings, 0
        if time.monotonic() - self._last_reclaim >= self.reclaim_every_s:
            self._last_reclaim = time.monotonic()
            n += self.process(self.bus.reclaim(s.post_topic, s.group, self.consumer, s.reclaim_idle_ms, count))
        n += self.process(self.bus.consume(s.post_topic, s.group, self.consumer, count=count, block_ms=block_ms))
        if time.monotonic() - self._last_backlog >= self.backlog_every_s:
            self.refresh_backlog()
        return n

    def run(self, stop_event: threading.Event, count: int = 50, block_ms: int = 500) -> int:
        """Loop ``run_once`` until ``stop_event`` is set; first (and after every Redis error) the
        worker re-reads its own pending posts (a restart under the same consumer name resumes
        them at once, without waiting ``reclaim_idle_ms``). Returns the posts handled."""
        s = self.settings
        return run_consumer_loop(
            stop_event, lambda: self.process(self.bus.consume_own_pending(s.post_topic, s.group, self.consumer, count)),
            lambda: self.run_once(count, block_ms), "fan-out worker")

    def refresh_backlog(self) -> int:
        """Set the backlog gauge (undelivered + pending posts of the group); returns it."""
        self._last_backlog = time.monotonic()
        b = self.bus.backlog(self.settings.post_topic, self.settings.group)
        value = (b.lag or 0) + b.pending
        self.metrics.backlog.labels(topic=self.settings.post_topic, group=self.settings.group).set(value)
        return value
