"""The batched engagement write (``engagement_batch.lua``) on a real redis-server.

1. It leaves exactly what the per-event script it replaced leaves (``lua/engagement_per_event.lua``,
   one call per event, the reference), byte for byte, on random events with duplicate ids within
   and across batches, events out of order, outside the 24 h window and ahead of the clock, and
   with caps small enough that every trim path runs (trending, recent posts / authors, the action
   sequence), then with the real caps.
2. The processor's failure modes of a batch: one event whose key has the wrong type fails alone
   (the rest of its batch is applied, nothing of it is written); a batch written but not
   acknowledged (a crash between the write and the XACK) is a no-op when redelivered; a server that
   lost its script cache is handled; a read longer than ``MAX_BATCH_EVENTS`` is several calls.
"""

from __future__ import annotations

import random
from datetime import datetime, timezone
from pathlib import Path

import pytest
import redis

from core import online_layout as keys
from core import realtime as rt
from core.schema import POSITIVE_HEADS
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
from pipelines.sequences import ENGAGED_HEADS
from pipelines.streaming import processor as processor_module
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import EngagementEvent
from pipelines.streaming.processor import StreamProcessor
from pipelines.streaming.scripts import EngagementBatchArgs, EngagementBatchScript

pytestmark = pytest.mark.integration

NOW = 1_651_406_400 + 100.0  # 2022-05-01 12:01:40 UTC
REFERENCE = Path(__file__).with_name("lua") / "engagement_per_event.lua"
POSTS, USERS = range(10), range(6)


def _author(post: int) -> int:
    return 100 + post % 3


def _eng(eid, kind, ts, user=1, post=10, author=7) -> EngagementEvent:
    return EngagementEvent(event_id=str(eid), kind=kind, user_id=user, post_id=post, author_id=author,
                           event_ts=datetime.fromtimestamp(ts, tz=timezone.utc))


def _reference_call(e: EngagementEvent, write_s: float, seen_ttl: int, caps: dict) -> tuple[list, list]:
    """KEYS / ARGV of the per-event script for ``e`` (its former ``EngagementKeys.of`` /
    ``EngagementArgs.of``). Its post meta and post score hashes are the counts hash, which holds the
    newest-event fields and the score since the layout merged the three (its pruning skips fields
    without a bucket)."""
    u, p, a, t = e.user_id, e.post_id, e.author_id, e.event_ts.timestamp()
    k = [keys.rt_seen_set(rt.seen_hour(t)), keys.rt_post_counts(p), keys.rt_post_counts(p), keys.rt_post_counts(p),
         keys.rt_author_score(a), keys.rt_user_recent_posts(u), keys.rt_user_recent_authors(u), keys.hated_authors(u),
         keys.follows(u), keys.rt_social_ts(u), keys.POST_META, keys.RT_TRENDING_POSTS, keys.RT_TRENDING_TAGS,
         keys.RT_COVERAGE, keys.action_sequence(u)]
    args = [seen_ttl, e.kind, rt.bucket_start(t), f"{t:.6f}", f"{write_s:.6f}", repr(rt.kind_weight(e.kind)), p, a,
            int(e.kind in POSITIVE_HEADS), int(e.kind in ENGAGED_HEADS), repr(rt.HALF_LIFE_S), rt.COUNTS_TTL_S,
            rt.SCORE_TTL_S, caps["recent_cap"], rt.RETENTION_S, rt.BUCKET_S, repr(rt.TRENDING_HALF_LIFE_S),
            caps["trending_cap"], rt.OUT_OF_ORDER_S, caps["sequence_cap"], e.event_id]
    return k, args


def _batch_call(events: list, write_s: float, seen_ttl: int, caps: dict) -> tuple[list, list]:
    k, args, _ = EngagementBatchScript.layout(events, write_s, seen_ttl)
    for name, value in caps.items():  # the caps sit in the fixed head of ARGV
        args[EngagementBatchArgs._fields.index(name)] = value
    return k, args


def _dump(client: redis.Redis, events, posts=POSTS, users=USERS) -> dict:
    """Every key the engagement scripts can write for ``posts`` / ``users`` / the posts' authors
    and ``events`` (their idempotency sets): type, content (scores as Redis prints them) and whether
    it has a TTL (the TTL itself within 5 s)."""
    names = [keys.RT_TRENDING_POSTS, keys.RT_TRENDING_TAGS, keys.RT_COVERAGE]
    names += [keys.rt_seen_set(rt.seen_hour(e.event_ts.timestamp())) for e in events]
    for p in posts:
        names += [keys.rt_post_counts(p)]
    names += [keys.rt_author_score(_author(p)) for p in posts]
    for u in users:
        names += [keys.rt_user_recent_posts(u), keys.rt_user_recent_authors(u), keys.hated_authors(u), keys.follows(u),
                  keys.rt_social_ts(u), keys.action_sequence(u)]
    out = {}
    for name in sorted(set(names)):
        kind = client.type(name).decode()
        if kind == "none":
            continue
        if kind == "hash":
            value = dict(sorted(client.hgetall(name).items()))
        elif kind == "zset":
            value = client.zrange(name, 0, -1, withscores=True, score_cast_func=bytes)
        elif kind == "set":
            value = sorted(client.smembers(name))
        else:
            value = client.get(name)
        ttl = client.ttl(name)
        out[name] = (kind, value, None if ttl < 0 else ttl)
    return out


def _differ(got: dict, want: dict) -> list[str]:
    """Keys of two ``_dump``s that differ: type, content, or TTL by more than 5 s (the two sides
    are written seconds apart on a busy machine, so their TTLs need not round alike)."""
    def same(a, b):
        return a is not None and b is not None and a[:2] == b[:2] and (
            (a[2] is None) == (b[2] is None) and (a[2] is None or abs(a[2] - b[2]) <= 5))
    return [k for k in sorted(got.keys() | want.keys()) if not same(got.get(k), want.get(k))]


def _random_events(rng: random.Random, n: int) -> list[EngagementEvent]:
    kinds = ["impression"] * 6 + ["click"] * 3 + ["long_view", "like", "comment", "forward", "follow", "hate"]
    events = []
    for i in range(n):
        post = rng.choice(POSTS)
        r = rng.random()
        if r < 0.8:
            ts = NOW - rng.uniform(0, 3 * 3600)           # recent, out of order
        elif r < 0.93:
            ts = NOW - rng.uniform(20 * 3600, 30 * 3600)  # around / beyond the 24 h window
        else:
            ts = NOW + rng.uniform(0, 86400)              # ahead of the processor's clock
        events.append(_eng(f"r{i}", rng.choice(kinds), round(ts, 6), user=rng.choice(USERS), post=post,
                           author=_author(post)))
    return events


@pytest.mark.parametrize("caps", [dict(trending_cap=4, recent_cap=3, sequence_cap=4),
                                  dict(trending_cap=rt.TRENDING_CAP, recent_cap=rt.RECENT_CAP,
                                       sequence_cap=EngagementBatchArgs._field_defaults["sequence_cap"])],
                         ids=["small-caps", "real-caps"])
def test_a_batch_leaves_what_one_script_per_event_leaves(redis_client, caps):
    conn = redis_client.connection_pool.connection_kwargs
    reference_db = redis.Redis(host=conn["host"], port=conn["port"], db=conn.get("db", 0) + 1)
    reference_db.flushdb()
    try:
        rng = random.Random(23)
        meta = {str(p): keys.encode_post_meta(_author(p), 0, rng.sample(range(1, 6), rng.randrange(0, 3)))
                for p in POSTS if p < 8}  # posts 8, 9: no metadata (no tags)
        for c in (redis_client, reference_db):
            c.hset(keys.POST_META, mapping=meta)
        events = _random_events(rng, 500)
        # deliveries: every event once in order, some again later (redelivery) or twice in one batch,
        # and a few ids reused two hours later (a malformed producer): each hour's set tells them apart
        deliveries = []
        for e in events:
            deliveries.append(e)
            if rng.random() < 0.08:
                deliveries.append(e if rng.random() < 0.5 else rng.choice(events[:events.index(e) + 1]))
            if rng.random() < 0.03:
                deliveries.append(_eng(e.event_id, e.kind, e.event_ts.timestamp() - 7200, user=e.user_id,
                                       post=e.post_id, author=e.author_id))
        reference = reference_db.register_script(REFERENCE.read_text())
        batch = redis_client.register_script(EngagementBatchScript(redis_client).source)
        at, write_s, calls = 0, NOW, 0
        while at < len(deliveries):
            size = rng.choice([1, 2, 7, 30, 80])
            chunk, at = deliveries[at:at + size], at + size
            write_s += rng.uniform(0, 400)  # the processor's clock moves between batches
            want = [reference(*_reference_call(e, write_s, 3600, caps)) for e in chunk]
            got = batch(*_batch_call(chunk, write_s, 3600, caps))
            assert got == want, f"batch {calls}: results differ"
            calls += 1
        assert calls > 10
        ids = {e.event_id for e in events}
        got, want = _dump(redis_client, deliveries), _dump(reference_db, deliveries)
        assert got.keys() == want.keys()
        assert _differ(got, want) == []
        # the state is not trivial: every path of the scripts ran
        assert len(ids) < len(deliveries) and redis_client.exists(keys.RT_TRENDING_TAGS)
        if caps["recent_cap"] == 3:
            assert max(redis_client.zcard(keys.rt_user_recent_posts(u)) for u in USERS) == 3
            assert redis_client.zcard(keys.RT_TRENDING_POSTS) == 4
    finally:
        reference_db.flushdb()
        reference_db.close()


def test_a_call_longer_than_the_scripts_chunks_leaves_what_one_script_per_event_leaves(redis_client):
    """engagement_batch.lua sends at most 1000 values per unpack() (Lua's C stack): a call of 1500
    events on 1500 posts (seen markers, tags and trending members past one chunk) still equals the
    reference."""
    conn = redis_client.connection_pool.connection_kwargs
    reference_db = redis.Redis(host=conn["host"], port=conn["port"], db=conn.get("db", 0) + 1)
    reference_db.flushdb()
    try:
        posts = range(1500)
        meta = {str(p): keys.encode_post_meta(_author(p), 0, [p % 1200, 2000 + p % 700]) for p in posts}
        for c in (redis_client, reference_db):
            c.hset(keys.POST_META, mapping=meta)
        events = [_eng(f"c{p}", "like" if p % 4 else "click", NOW - p, user=p % 6, post=p, author=_author(p))
                  for p in posts]
        caps = dict(trending_cap=rt.TRENDING_CAP, recent_cap=rt.RECENT_CAP,
                    sequence_cap=EngagementBatchArgs._field_defaults["sequence_cap"])
        reference = reference_db.register_script(REFERENCE.read_text())
        want = [reference(*_reference_call(e, NOW, 3600, caps)) for e in events]
        got = redis_client.register_script(EngagementBatchScript(redis_client).source)(
            *_batch_call(events, NOW, 3600, caps))
        assert got == want == [1] * len(events)
        assert redis_client.zcard(keys.RT_TRENDING_POSTS) == 1500 and redis_client.zcard(keys.RT_TRENDING_TAGS) == 1900
        ids = {e.event_id for e in events}
        got, want = _dump(redis_client, events, posts, USERS), _dump(reference_db, events, posts, USERS)
        assert _differ(got, want) == []
    finally:
        reference_db.flushdb()
        reference_db.close()


def _proc(client, bus, name="c1", **kw) -> StreamProcessor:
    return StreamProcessor(client, bus, consumer=name, clock=lambda: NOW + 1.0, **kw)


def _pending(client) -> int:
    return client.xpending(keys.event_stream("engagements"), "feature-writer")["pending"]


def test_a_bad_key_fails_its_own_event_and_the_rest_of_the_batch_is_applied(redis_client):
    bus = RedisStreamsBus(redis_client)
    events = [_eng(f"b{i}", "click", NOW - 10 * i, post=40 + i) for i in range(5)]
    for e in events:
        bus.publish("engagements", e)
    redis_client.set(keys.rt_post_counts(42), "not a hash")
    proc = _proc(redis_client, bus, name="A")
    assert proc.run_once(count=10) == 4
    assert proc.stats["failed"] == 1 and proc.stats["applied"] == 4 and _pending(redis_client) == 1
    # nothing of the failed event was written; the others are complete
    assert not redis_client.sismember(keys.rt_seen_set(rt.seen_hour(NOW - 20)), "b2")
    assert redis_client.get(keys.rt_post_counts(42)) == b"not a hash"
    assert redis_client.zscore(keys.RT_TRENDING_POSTS, 42) is None
    reader = RealtimeFeatureReader(redis_client)
    counts = reader.post_window_counts([40, 41, 43, 44], NOW)
    assert all(counts[p]["rt_clicks_1h"] == 1 for p in (40, 41, 43, 44))
    redis_client.delete(keys.rt_post_counts(42))
    b = _proc(redis_client, bus, name="B", reclaim_idle_ms=0)
    assert b.run_once(count=10) == 1 and b.stats["duplicate"] == 0
    assert _pending(redis_client) == 0 and reader.post_window_counts([42], NOW)[42]["rt_clicks_1h"] == 1


def test_a_batch_written_but_not_acknowledged_is_a_no_op_when_delivered_again(redis_client):
    """A crash between the batched write and the XACK: every entry stays pending with its id in
    its hour's idempotency set, and the consumer that reclaims them changes nothing."""
    bus = RedisStreamsBus(redis_client)
    rng = random.Random(3)
    events = [_eng(f"w{i}", rng.choice(["impression", "click", "like", "long_view"]), NOW - rng.uniform(0, 3600),
                   user=rng.choice(USERS), post=rng.choice(POSTS)) for i in range(60)]
    for e in events:
        bus.publish("engagements", e)
    crashed = _proc(redis_client, bus, name="A")
    got = bus.consume("engagements", "feature-writer", "A", count=100)
    assert crashed.apply_many([d.event for d in got]) == [True] * 60  # written, never acknowledged
    before = _dump(redis_client, events)
    marked = {keys.rt_seen_set(rt.seen_hour(e.event_ts.timestamp())) for e in events}
    assert _pending(redis_client) == 60 and sum(len(before[k][1]) for k in marked) == 60
    b = _proc(redis_client, bus, name="B", reclaim_idle_ms=0)
    assert b.run_once(count=100) == 0
    assert b.stats["duplicate"] == 60 and _pending(redis_client) == 0
    after = _dump(redis_client, events)
    after[keys.RT_COVERAGE][1].pop(b"caught_up")  # the liveness stamp moved on: the group caught up
    assert _differ(after, before) == []


def test_a_server_that_lost_its_scripts_gets_them_again(redis_client):
    bus = RedisStreamsBus(redis_client)
    proc = _proc(redis_client, bus)
    for i in range(3):
        bus.publish("engagements", _eng(f"s{i}", "like", NOW - i))
    redis_client.script_flush()  # as after a restart without persistence of the script cache
    assert proc.run_once(count=10) == 3
    assert proc.stats["failed"] == 0 and _pending(redis_client) == 0
    bus.publish("engagements", _eng("s3", "like", NOW))
    assert proc.run_once(count=10) == 1  # the reloaded script serves the next batches
    assert RealtimeFeatureReader(redis_client).post_window_counts([10], NOW)[10]["rt_likes_5m"] == 4


def test_a_read_longer_than_one_call_is_split_and_applied_once(redis_client):
    n = processor_module.MAX_BATCH_EVENTS + 150
    events = [_eng(f"m{i}", "impression" if i % 3 else "click", NOW - i % 250, user=i % 7, post=i % 11)
              for i in range(n)]
    proc = _proc(redis_client, RedisStreamsBus(redis_client))
    assert proc.apply_many(events) == [True] * n
    assert proc.apply_many(events[900:1100]) == [False] * 200  # again, across the split: all duplicates
    counts = RealtimeFeatureReader(redis_client).post_window_counts(range(11), NOW)
    assert sum(c["rt_impressions_24h"] + c["rt_clicks_24h"] for c in counts.values()) == n


def test_an_hours_idempotency_set_lives_seen_ttl_past_its_last_write(redis_client):
    """Ids of one event hour share one set; each write sets its expiry to seen_ttl from now, so an
    id stays marked at least seen_ttl after it was added, and an id of another hour is not in it."""
    proc = _proc(redis_client, RedisStreamsBus(redis_client), seen_ttl_s=600)
    hour = keys.rt_seen_set(rt.seen_hour(NOW))
    assert proc.apply_many([_eng("h1", "click", NOW - 5)]) == [True]
    assert redis_client.smembers(hour) == {b"h1"} and 590 <= redis_client.ttl(hour) <= 600
    redis_client.expire(hour, 30)  # as if most of the TTL had passed
    earlier = _eng("h0", "click", rt.seen_hour(NOW) - 1)  # the hour before: its own set
    assert proc.apply_many([_eng("h2", "like", NOW - 3), earlier]) == [True, True]
    assert redis_client.smembers(hour) == {b"h1", b"h2"} and 590 <= redis_client.ttl(hour) <= 600
    assert redis_client.smembers(keys.rt_seen_set(rt.seen_hour(NOW) - 3600)) == {b"h0"}
    assert proc.apply_many([_eng("h1", "click", NOW - 5), earlier]) == [False, False]  # still marked
    assert RealtimeFeatureReader(redis_client).post_window_counts([10], NOW)[10]["rt_clicks_1h"] == 2
