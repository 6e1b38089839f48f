"""The stream processor: engagement / social events -> real-time features in Redis (the online store).

Each event is applied in ONE Lua script (atomic in Redis) that first checks the key types (a
script is not rolled back on an error, so every check that can fail comes before the first write),
then sets ``hm:rt:seen:{event_id}`` (``EX ttl``) only if absent and changes nothing if it existed, so an
event delivered twice (at-least-once bus, reclaim after a crash) counts once. The bus entry is
acknowledged only after the script returned; a failed write leaves it pending, and a processor
reclaims entries idle for ``reclaim_idle_ms`` when it starts and every ``reclaim_every_s`` after.
Key layout and the window / decay math: ``pipelines/streaming/realtime_features.py``.

``PostCreatedEvent`` entries are acknowledged without a write (the candidate index owns posts).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import threading
import time
from typing import Callable

import numpy as np
import redis

from core.schema import POSITIVE_HEADS
from pipelines.streaming import realtime_features as rt
from pipelines.streaming.bus import STREAM_LUA_HELPERS, Delivery, EventBus, stream_key
from pipelines.streaming.events import EngagementEvent, SocialGraphEvent
from pipelines.streaming.metrics import StreamMetrics

log = logging.getLogger(__name__)

def _guarded_once(key_types: str) -> str:
    """Lua prelude shared by the scripts: check every KEYS[i] has the type named at position i
    (or does not exist) before any write, since a Lua script is not rolled back on an error and a
    failure must leave nothing behind, not even the seen marker (the entry then stays pending);
    then return 0 if KEYS[1], the event's seen marker, exists, else set it with TTL ARGV[1]."""
    want = ", ".join(f"'{t}'" for t in key_types.split())
    return f"""
local want = {{{want}}}
for i, t in ipairs(want) do
  local got = redis.call('TYPE', KEYS[i])['ok']
  if got ~= 'none' and got ~= t then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' is a ' .. got .. ', expected ' .. t)
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
"""


# KEYS: 1 seen, 2 counts, 3 meta, 4 post score, 5 author score, 6 user posts, 7 user authors,
#       8 hated authors, 9 follows, 10 social ts, 11 post meta (candidate index), 12 trending posts,
#       13 trending tags, 14 coverage
# ARGV: 1 seen ttl, 2 kind, 3 bucket start, 4 event ts, 5 write ts, 6 weight, 7 half-life,
#       8 counts ttl, 9 score ttl, 10 recent cap, 11 post id, 12 author id, 13 positive (0/1),
#       14 retention s, 15 bucket s, 16 trending half-life, 17 trending cap, 18 out-of-order margin s
_ENGAGEMENT_LUA = _guarded_once("string hash hash hash hash zset zset set set hash hash zset zset hash") + r"""
local kind = ARGV[2]
local bucket = tonumber(ARGV[3])
local ets = tonumber(ARGV[4])
local w = tonumber(ARGV[6])
local half = tonumber(ARGV[7])
local retention = tonumber(ARGV[14])
local bucket_s = tonumber(ARGV[15])
local prev = redis.call('HGET', KEYS[3], 'last_event_ts')
local newest = ets
if prev and tonumber(prev) > ets then newest = tonumber(prev) end
redis.call('HSET', KEYS[3], 'last_event_ts', string.format('%.6f', newest), 'last_write_ts', ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[8])
-- a bucket wholly older than the 24 h window of the newest event is dropped, never written; the
-- newest is taken at most a bucket ahead of the processor's clock, so one event from a skewed
-- producer cannot push the post's real buckets out of the window
local horizon = math.min(newest, tonumber(ARGV[5]) + bucket_s) - retention
if bucket + bucket_s > horizon then
  local n = redis.call('HINCRBY', KEYS[2], kind .. ':' .. ARGV[3], 1)
  if n == 1 then
    -- a new field: prune expired buckets (at most once per kind and bucket, so O(fields) is cheap)
    for _, f in ipairs(redis.call('HKEYS', KEYS[2])) do
      local b = tonumber(string.match(f, ':(%-?%d+)$'))
      if b and b + bucket_s <= horizon then redis.call('HDEL', KEYS[2], f) end
    end
  end
  redis.call('EXPIRE', KEYS[2], ARGV[8])
end
local function decayed_add(key)
  local cur = redis.call('HMGET', key, 'v', 't')
  local v, t = 0.0, ets
  if cur[1] then v = tonumber(cur[1]); t = tonumber(cur[2]) end
  if ets >= t then
    v = v * math.pow(2, -(ets - t) / half) + w
    t = ets
  else
    v = v + w * math.pow(2, -(t - ets) / half)
  end
  redis.call('HSET', key, 'v', string.format('%.17g', v), 't', string.format('%.17g', t))
  redis.call('EXPIRE', key, ARGV[9])
end
-- coverage (rt.StreamCoverage): ``newest`` event time, ``first`` (the first event applied) and
-- ``since``, the earliest event time applied that can count in a window: within 24 h of newest and at
-- most ARGV[18] (rt.OUT_OF_ORDER_S) before first, so a lone straggler cannot claim that the stream
-- holds everything back to its time. An event more than a bucket ahead of the processor's
-- clock (a skewed producer) is applied but moves no coverage field.
if ets <= tonumber(ARGV[5]) + bucket_s then
  local cov = redis.call('HMGET', KEYS[14], 'since', 'newest', 'first')
  local gnewest = ets
  if cov[2] and tonumber(cov[2]) > ets then gnewest = tonumber(cov[2]) else redis.call('HSET', KEYS[14], 'newest', ARGV[4]) end
  local first = ets
  if cov[3] then first = tonumber(cov[3]) else redis.call('HSET', KEYS[14], 'first', ARGV[4]) end
  if ets > gnewest - retention and ets >= first - tonumber(ARGV[18]) and ((not cov[1]) or tonumber(cov[1]) > ets) then
    redis.call('HSET', KEYS[14], 'since', ARGV[4])
  end
end
-- forward decay in log2 space: score = log2(sum_i w_i 2^(t_i / half)), summed with log-sum-exp
local function trending_add(key, member, x)
  local cur = redis.call('ZSCORE', key, member)
  if cur then
    cur = tonumber(cur)
    local hi, lo = math.max(cur, x), math.min(cur, x)
    x = hi + math.log(1 + math.pow(2, lo - hi)) / math.log(2)
  end
  redis.call('ZADD', key, string.format('%.17g', x), member)
  redis.call('ZREMRANGEBYRANK', key, 0, -(tonumber(ARGV[17]) + 1))
end
if w > 0 then
  decayed_add(KEYS[4])
  decayed_add(KEYS[5])
  local x = math.log(w) / math.log(2) + ets / tonumber(ARGV[16])
  trending_add(KEYS[12], ARGV[11], x)
  local meta = redis.call('HGET', KEYS[11], ARGV[11])
  if meta then
    local tags = string.match(meta, '|([%d,]*)$')
    if tags then
      for tag in string.gmatch(tags, '%d+') do trending_add(KEYS[13], tag, x) end
    end
  end
end
if ARGV[13] == '1' then
  local cap = tonumber(ARGV[10])
  redis.call('ZADD', KEYS[6], 'GT', ets, ARGV[11])
  redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -(cap + 1))
  redis.call('ZADD', KEYS[7], 'GT', ets, ARGV[12])
  redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -(cap + 1))
end
if kind == 'hate' then redis.call('SADD', KEYS[8], ARGV[12]) end
if kind == 'follow' then
  -- an engagement "follow" is a follow action: same stale-event rule as SocialGraphEvent
  local f = 'follow:' .. ARGV[12]
  local last = redis.call('HGET', KEYS[10], f)
  if (not last) or tonumber(last) <= ets then
    redis.call('HSET', KEYS[10], f, ARGV[4])
    redis.call('SADD', KEYS[9], ARGV[12])
  end
end
return 1
"""

# KEYS: 1 seen, 2 social ts, 3 follows, 4 blocked, 5 muted; ARGV: 1 seen ttl, 2 action, 3 author, 4 event ts
# An older action than the last applied one of the same family (follow/unfollow, block, mute) for
# the pair is stale (arrived out of order) and ignored; a block also counts as the latest follow action.
_SOCIAL_LUA = _guarded_once("string hash set set set") + r"""
local action, author, ets = ARGV[2], ARGV[3], tonumber(ARGV[4])
local family = action
if action == 'unfollow' then family = 'follow' end
local last = redis.call('HGET', KEYS[2], family .. ':' .. author)
if last and tonumber(last) > ets then return 2 end
redis.call('HSET', KEYS[2], family .. ':' .. author, ARGV[4])
if action == 'follow' then redis.call('SADD', KEYS[3], author)
elseif action == 'unfollow' then redis.call('SREM', KEYS[3], author)
elseif action == 'block' then
  redis.call('SADD', KEYS[4], author)
  local lf = redis.call('HGET', KEYS[2], 'follow:' .. author)
  if (not lf) or tonumber(lf) <= ets then
    redis.call('SREM', KEYS[3], author)
    redis.call('HSET', KEYS[2], 'follow:' .. author, ARGV[4])
  end
elseif action == 'mute' then redis.call('SADD', KEYS[5], author)
end
return 1
"""


# The liveness stamp. KEYS: 1 coverage, 2 stream; ARGV: 1 group. On the Redis server clock (stream
# ids are Redis ms too, so the processor's and the mixer's clocks never enter): caught_up = the
# time before which every entry of the stream has been applied or dead-lettered by the group, i.e.
# min(now, the oldest entry not yet delivered to the group, the oldest entry pending in it). It
# only moves forward (processors of a group stamp concurrently), up to the server time. Entries
# trimmed before delivery are not waited for (EventBus.skip_trimmed reports them). One field for the
# Redis database: run one processor group (one topic) per online store. Returns the value (s) or
# nil when the stream or group does not exist.
_STAMP_LUA = STREAM_LUA_HELPERS + r"""
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local t = now_ms
local g = group_info(KEYS[2], ARGV[1])
if not g then return nil end
local last = g['last-delivered-id']
local undelivered = redis.call('XRANGE', KEYS[2], '(' .. last, '+', 'COUNT', 1)
if #undelivered > 0 then t = math.min(t, (id_parts(undelivered[1][1]))) end
local oldest = redis.call('XPENDING', KEYS[2], ARGV[1], '-', '+', 1)  -- O(1), unlike the summary form
if #oldest > 0 then t = math.min(t, (id_parts(oldest[1][1]))) end
local v = t / 1000
local cur = redis.call('HGET', KEYS[1], 'caught_up')
-- a value ahead of the server clock (the clock stepped back, a failover) is replaced, not kept
if (not cur) or tonumber(cur) < v or tonumber(cur) * 1000 > now_ms then
  redis.call('HSET', KEYS[1], 'caught_up', string.format('%.3f', v))
end
return string.format('%.3f', v)
"""


class StreamProcessor:
    """Consumes ``topic`` as ``consumer`` of ``group`` and writes real-time features.

    A batch of deliveries is written in one pipeline (one EVALSHA per event, each atomic on its
    own; redis-py first checks the scripts are loaded with one SCRIPT EXISTS, so two round trips)
    and acknowledged with one XACK for the events whose write succeeded.

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
        stamp_every_s: batches write the liveness stamp (``_STAMP_LUA``, ~50 us in Redis) at
            most this often (s); the mixer's staleness limit is tens of seconds.

    Raises:
        ValueError: a negative ``reclaim_idle_ms`` / ``stamp_every_s`` or a non-positive ttl / window.
    """

    def __init__(self, client: redis.Redis, bus: EventBus, topic: str = "engagements",
                 group: str = "feature-writer", consumer: str | None = None, reclaim_idle_ms: int = 30_000,
                 reclaim_every_s: float = 30.0, seen_ttl_s: int = rt.SEEN_TTL_S,
                 clock: Callable[[], float] = time.time, lag_window: int = 10_000,
                 metrics: StreamMetrics | None = None, backlog_every_s: float = 1.0,
                 stamp_every_s: float = 0.1):
        if reclaim_idle_ms < 0 or seen_ttl_s < 1 or lag_window < 1 or stamp_every_s < 0:
            raise ValueError("need reclaim_idle_ms >= 0, seen_ttl_s >= 1, lag_window >= 1, stamp_every_s >= 0")
        self.client, self.bus, self.topic, self.group = client, bus, topic, group
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.reclaim_idle_ms, self.reclaim_every_s, self.seen_ttl_s = reclaim_idle_ms, reclaim_every_s, seen_ttl_s
        self.clock = clock
        self.metrics = metrics or StreamMetrics()
        self.backlog_every_s, self.stamp_every_s = backlog_every_s, stamp_every_s
        self._last_stamp = -math.inf
        self._engagement = client.register_script(_ENGAGEMENT_LUA)
        self._social = client.register_script(_SOCIAL_LUA)
        self._stamp = client.register_script(_STAMP_LUA)
        self._lags: collections.deque[float] = collections.deque(maxlen=lag_window)
        self._last_reclaim: float | None = None
        self._last_backlog = -math.inf
        self._outcome_counters: dict = {}
        self._lag_histogram = self.metrics.lag.labels(topic=topic)
        self.stats = collections.Counter()  # applied, duplicate, stale, skipped, failed, lost

    # ---- applying events ----
    def _call(self, event, write_ts: float, client) -> bool:
        """Queue (on a pipeline) or run the event's script; False if the event needs no write."""
        ets = event.event_ts.timestamp() if hasattr(event, "event_ts") else 0.0
        if isinstance(event, EngagementEvent):
            u, p, a = event.user_id, event.post_id, event.author_id
            self._engagement(
                keys=[rt.seen_key(event.event_id), rt.post_counts_key(p), rt.post_meta_key(p), rt.post_score_key(p),
                      rt.author_score_key(a), rt.user_recent_posts_key(u), rt.user_recent_authors_key(u),
                      rt.hated_authors_key(u), rt.follows_key(u), rt.social_ts_key(u), rt.POST_META_KEY,
                      rt.TRENDING_POSTS_KEY, rt.TRENDING_TAGS_KEY, rt.COVERAGE_KEY],
                args=[self.seen_ttl_s, event.kind, rt.bucket_start(ets), f"{ets:.6f}", f"{write_ts:.6f}",
                      repr(rt.kind_weight(event.kind)), repr(rt.HALF_LIFE_S), rt.COUNTS_TTL_S, rt.SCORE_TTL_S,
                      rt.RECENT_CAP, p, a, int(event.kind in POSITIVE_HEADS), rt.RETENTION_S, rt.BUCKET_S,
                      repr(rt.TRENDING_HALF_LIFE_S), rt.TRENDING_CAP, rt.OUT_OF_ORDER_S],
                client=client)
            return True
        if isinstance(event, SocialGraphEvent):
            u = event.user_id
            self._social(
                keys=[rt.seen_key(event.event_id), rt.social_ts_key(u), rt.follows_key(u),
                      rt.blocked_authors_key(u), rt.muted_authors_key(u)],
                args=[self.seen_ttl_s, event.action, event.author_id, f"{ets:.6f}"],
                client=client)
            return True
        return False

    def _record(self, outcome: str, event=None, done_ts: float = 0.0, n: int = 1) -> None:
        self.stats[outcome] += n
        counter = self._outcome_counters.get(outcome)
        if counter is None:  # labels() costs ~2.5 us: resolve each child once
            counter = self._outcome_counters[outcome] = self.metrics.events.labels(topic=self.topic, outcome=outcome)
        counter.inc(n)
        if outcome == "applied":
            lag = done_ts - event.event_ts.timestamp()
            self._lags.append(lag)
            self._lag_histogram.observe(max(lag, 0.0))

    def apply(self, event) -> bool:
        """Write one event's features atomically; ``True`` if applied now, ``False`` if it was a
        duplicate (already applied) or needs no write. Raises ``redis.RedisError`` on a failed write."""
        return self.apply_many([event])[0]

    def apply_many(self, events: list) -> list[bool | Exception]:
        """Write several events in one pipeline (each event's script is atomic; see the class).

        Returns per event ``True`` (applied now), ``False`` (duplicate, stale or no write needed) or
        the ``redis.RedisError`` its write raised (nothing of that event was written).

        Raises:
            redis.RedisError: the round trip itself failed (connection lost): events before the
                failure may have been applied, which is safe since a retry is idempotent.
        """
        return self._write(events, stamp=False)

    def _write(self, events: list, stamp: bool) -> list[bool | Exception]:
        write_ts = self.clock()
        pipe = self.client.pipeline(transaction=False)
        queued = [self._call(e, write_ts, pipe) for e in events]
        if stamp:
            # after the writes, before their XACK: this batch is still pending, so the stamp
            # claims only what preceded it (a failed write keeps it there until it succeeds)
            self._stamp(keys=[rt.COVERAGE_KEY, stream_key(self.topic)], args=[self.group], client=pipe)
        results = iter(pipe.execute(raise_on_error=False) if any(queued) or stamp else [])
        done_ts = self.clock()  # the writes are visible to readers from here: the lag's end
        out: list[bool | Exception] = []
        for event, q in zip(events, queued):
            if not q:
                self._record("skipped")
                out.append(False)
                continue
            res = next(results)
            if isinstance(res, Exception):
                self._record("failed")
                out.append(res)
                continue
            outcome = {0: "duplicate", 1: "applied"}.get(int(res), "stale")
            self._record(outcome, event, done_ts)
            out.append(outcome == "applied")
        if stamp:
            res = next(results)
            if isinstance(res, Exception) or res is None:
                # the mixer will judge the stream stale: say why here
                log.warning("liveness stamp of %s / %s failed: %s", self.topic, self.group,
                            res if res is not None else "no such stream or group in the online store's Redis "
                            "(the stamp reads the bus through the online store's client: both must be one Redis)")
        return out

    # ---- consuming ----
    def _process(self, deliveries: list[Delivery]) -> int:
        """Write ``deliveries`` with the liveness stamp (``_STAMP_LUA``; if ``stamp_every_s`` has
        passed) in one pipeline, then XACK the ones written; an empty batch writes the stamp alone
        (an idle processor stays live)."""
        now = time.monotonic()
        stamp = now - self._last_stamp >= self.stamp_every_s
        if stamp:
            self._last_stamp = now
        results = self._write([d.event for d in deliveries], stamp=stamp)
        done = []
        for d, res in zip(deliveries, results):
            if isinstance(res, Exception):
                # No ack: the entry stays pending and is reclaimed later (or dead-lettered after
                # max_deliveries by the bus).
                log.warning("write failed for %s %s: %s; left pending", self.topic, d.id, res)
            else:
                done.append(d)
        if done:
            self.bus.ack_many(done)
        return sum(r is True for r in results)

    def _lost(self, n: int) -> None:
        """``n`` entries were trimmed before the group read them: the stream's windows have a hole,
        so coverage restarts at the next event applied (the mixer takes the part of each window
        before it from the batch values)."""
        log.error("%d %s entries were trimmed (MAXLEN) before group %s read them; their events are lost "
                  "(see the dead-letter stream). Raise the bus maxlen or keep the processors up; "
                  "real-time coverage restarts now", n, self.topic, self.group)
        self._record("lost", n=n)
        self.client.hdel(rt.COVERAGE_KEY, "since", "first")

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

    def run_once(self, count: int = 100, block_ms: int | None = None) -> int:
        """Reclaim orphaned entries if due (always on the first call), then read up to ``count`` new
        entries (waiting up to ``block_ms`` ms; ``None`` = no wait) and apply them, with the liveness
        stamp ``hm:rt:coverage`` ``caught_up`` (``_STAMP_LUA``; an idle processor stamps once per
        ``block_ms``, a busy one every ``stamp_every_s``), which the mixer reads to tell a live
        stream from a stopped or overloaded one.

        Returns the number of events applied now (duplicates and post-created events excluded).
        """
        applied = 0
        if self._last_reclaim is None or self.clock() - self._last_reclaim >= self.reclaim_every_s:
            applied += self.reclaim(count)
        lost = self.bus.skip_trimmed(self.topic, self.group)
        if lost:
            self._lost(lost)
        got = self.bus.consume(self.topic, self.group, self.consumer, count=count, block_ms=block_ms)
        applied += self._process(got)
        if time.monotonic() - self._last_backlog >= self.backlog_every_s:
            self.refresh_backlog()
        return applied

    def run(self, stop_event: threading.Event, count: int = 100, block_ms: int = 1000) -> int:
        """Loop ``run_once`` until ``stop_event`` is set (checked at least every ``block_ms`` ms);
        returns the total events applied. A Redis error is logged and retried after a second.

        At start and after every error it first re-reads its own pending entries (what this
        consumer name read but did not acknowledge, e.g. the batch in hand when Redis went away),
        which ``XREADGROUP >`` never returns and the reclaim would only take after ``reclaim_idle_ms``.
        """
        total, own_pending = 0, True
        while not stop_event.is_set():
            try:
                if own_pending:
                    total += self._process(self.bus.consume_own_pending(self.topic, self.group, self.consumer, count))
                    own_pending = False
                total += self.run_once(count, block_ms)
            except redis.RedisError as exc:
                log.warning("stream processor: %s; retrying", exc)
                own_pending = True
                stop_event.wait(1.0)
        return total

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
