"""The stream processor on a real redis-server: windows, idempotency, decay, crash recovery,
write failures and the mixer's social keys."""

import math
import random
import threading
import time
from datetime import datetime, timezone

import pytest

from core import online_layout as keys
from core import realtime as rt
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import EngagementEvent, PostCreatedEvent, SocialGraphEvent
from pipelines.streaming.processor import StreamProcessor

pytestmark = pytest.mark.integration

NOW = 1_651_406_400 + 100.0  # 2022-05-01 12:01:40 UTC, 100 s into a 5-min bucket


def _dt(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _eng(eid, kind, ts, user=1, post=10, author=7) -> EngagementEvent:
    return EngagementEvent(event_id=str(eid), kind=kind, user_id=user, post_id=post, author_id=author,
                           event_ts=_dt(ts))


def _proc(redis_client, bus, name="c1", **kw) -> StreamProcessor:
    return StreamProcessor(redis_client, bus, consumer=name, clock=lambda: NOW + 1.0, **kw)


def _pending(client, group="feature-writer") -> int:
    return client.xpending(keys.event_stream("engagements"), group)["pending"]


def _expected_windows(events, post, now):
    """Recompute window counts straight from the events (bucket-aligned windows)."""
    now_b = math.floor(now / 300)
    out = {}
    for kind in ("click", "impression", "like", "hate"):
        for w, secs in rt.WINDOWS_S.items():
            out[rt.feature_name(kind, w)] = float(sum(
                1 for e in events if e.post_id == post and e.kind == kind
                and now_b - secs // 300 < math.floor(e.event_ts.timestamp() / 300) <= now_b))
    return out


def _closed_score(events, now, key):
    return sum(rt.kind_weight(e.kind) * 2 ** (-(now - e.event_ts.timestamp()) / rt.HALF_LIFE_S)
               for e in events if key(e))


def test_window_counts_for_a_crafted_sequence(redis_client):
    bus = RedisStreamsBus(redis_client)
    offsets = {"click": [10, 90, 200, 3000, 4000, 50_000, 90_000], "impression": [5, 5, 1000, 80_000]}
    events = [_eng(f"{k}{i}", k, NOW - off) for k, offs in offsets.items() for i, off in enumerate(offs)]
    for e in events:
        bus.publish("engagements", e)
    proc = _proc(redis_client, bus)
    assert proc.run_once(count=100) == len(events)
    got = RealtimeFeatureReader(redis_client).post_window_counts([10, 11], NOW)
    # current bucket holds offsets 10, 90 (NOW is 100 s into it); 200 s is the previous bucket
    assert got[10]["rt_clicks_5m"] == 2 and got[10]["rt_clicks_1h"] == 4 and got[10]["rt_clicks_24h"] == 6
    assert got[10]["rt_impressions_5m"] == 2 and got[10]["rt_impressions_1h"] == 3
    assert got[10]["rt_impressions_24h"] == 4
    assert got[10] == pytest.approx({**got[10], **_expected_windows(events, 10, NOW)})
    assert all(v == 0.0 for v in got[11].values())
    meta = RealtimeFeatureReader(redis_client).post_meta(10)
    assert meta["last_event_ts"] == pytest.approx(NOW - 5) and meta["last_write_ts"] == pytest.approx(NOW + 1)
    p50, p99 = proc.lag_percentiles()
    assert 1.0 <= p50 <= p99 <= 90_001
    assert _pending(redis_client) == 0
    # the counts hash expires beyond 24 h
    assert rt.COUNTS_TTL_S > 86400 and redis_client.ttl(keys.rt_post_counts(10)) > 86400


def test_duplicate_event_ids_are_applied_once(redis_client):
    bus = RedisStreamsBus(redis_client)
    e = _eng("dup", "like", NOW - 60)
    for _ in range(3):
        bus.publish("engagements", e)
    bus.publish("engagements", _eng("other", "like", NOW - 30))
    proc = _proc(redis_client, bus)
    assert proc.run_once(count=10) == 2
    assert proc.stats["duplicate"] == 2
    assert proc.apply(e) is False  # applying again directly is also a no-op
    reader = RealtimeFeatureReader(redis_client)
    assert reader.post_window_counts([10], NOW)[10]["rt_likes_5m"] == 2
    want = _closed_score([e, _eng("other", "like", NOW - 30)], NOW, lambda x: True)
    assert reader.decayed_scores([10], NOW)[10] == pytest.approx(want, rel=1e-9)
    assert _pending(redis_client) == 0


def test_decayed_scores_match_closed_form_for_posts_and_authors(redis_client):
    rng = random.Random(11)
    kinds = ["click", "like", "comment", "impression", "hate", "long_view", "forward"]
    events = [_eng(i, rng.choice(kinds), NOW - rng.uniform(0, 2 * 86400), user=rng.randrange(5),
                   post=rng.randrange(4), author=100 + rng.randrange(2)) for i in range(300)]
    # authors are per post in reality; keep post -> author consistent
    events = [e.model_copy(update={"author_id": 100 + e.post_id % 2}) for e in events]
    proc = _proc(redis_client, RedisStreamsBus(redis_client))
    for e in events:  # random arrival order
        proc.apply(e)
    reader = RealtimeFeatureReader(redis_client)
    later = NOW + 3 * 3600
    posts = reader.decayed_scores(range(4), later)
    authors = reader.decayed_scores([100, 101], later, entity="author")
    for p in range(4):
        assert posts[p] == pytest.approx(_closed_score(events, later, lambda e: e.post_id == p), rel=1e-9)
    for a in (100, 101):
        assert authors[a] == pytest.approx(_closed_score(events, later, lambda e: e.author_id == a), rel=1e-9)
    assert reader.decayed_scores([99], later) == {99: 0.0}
    with pytest.raises(ValueError, match="entity"):
        reader.decayed_scores([1], later, entity="user")


def test_crashed_consumer_entries_are_reclaimed_without_loss_or_double_count(redis_client):
    rng = random.Random(5)
    bus = RedisStreamsBus(redis_client)
    events = [_eng(i, rng.choice(["click", "impression", "like"]), NOW - rng.uniform(0, 7200),
                   post=rng.randrange(3)) for i in range(60)]
    for e in events:
        bus.publish("engagements", e)
    bus.publish("engagements", PostCreatedEvent(event_id="pc", post_id=1, author_id=7, event_ts=_dt(NOW)))
    # Consumer A reads 40 entries, writes the first 20 and crashes before acking anything.
    crashed = _proc(redis_client, bus, name="A")
    got = bus.consume("engagements", "feature-writer", "A", count=40)
    for d in got[:20]:
        crashed.apply(d.event)
    assert _pending(redis_client) == 40
    # Consumer B starts: reclaims A's 40 (only 20 still need a write), then reads the other 21.
    b = _proc(redis_client, bus, name="B", reclaim_idle_ms=0)
    applied = b.run_once(count=100)
    assert applied + 20 == len(events)
    assert b.stats["duplicate"] == 20
    assert _pending(redis_client) == 0
    got = RealtimeFeatureReader(redis_client).post_window_counts(range(3), NOW)
    for p in range(3):
        assert got[p] == pytest.approx({**got[p], **_expected_windows(events, p, NOW)})
        assert sum(got[p][rt.feature_name(k, "24h")] for k in ("click", "impression", "like")) == \
            sum(1 for e in events if e.post_id == p)


def test_failed_write_is_not_acked_and_is_applied_after_reclaim(redis_client):
    bus = RedisStreamsBus(redis_client)
    e = _eng("x1", "click", NOW - 10, post=42)
    bus.publish("engagements", e)
    redis_client.set(keys.rt_post_counts(42), "not a hash")  # makes the script fail before any write
    proc = _proc(redis_client, bus, name="A")
    assert proc.run_once(count=10) == 0
    assert proc.stats["failed"] == 1 and _pending(redis_client) == 1
    assert not redis_client.sismember(keys.rt_seen_set(rt.seen_hour(NOW - 10)), "x1")
    # nothing half-written: the bad key as it was, no score of the author, no trending entry
    assert redis_client.get(keys.rt_post_counts(42)) == b"not a hash"
    assert not redis_client.exists(keys.rt_author_score(e.author_id))
    assert redis_client.zscore(keys.RT_TRENDING_POSTS, 42) is None
    redis_client.delete(keys.rt_post_counts(42))
    b = _proc(redis_client, bus, name="B", reclaim_idle_ms=0)
    assert b.run_once(count=10) == 1
    assert _pending(redis_client) == 0
    assert RealtimeFeatureReader(redis_client).post_window_counts([42], NOW)[42]["rt_clicks_5m"] == 1


def test_social_events_update_the_mixers_keys(redis_client):
    bus = RedisStreamsBus(redis_client)
    soc = [("s1", "follow", 7, NOW - 100), ("s2", "follow", 8, NOW - 90), ("s3", "block", 8, NOW - 50),
           ("s4", "mute", 9, NOW - 40), ("s5", "follow", 10, NOW - 30), ("s6", "unfollow", 10, NOW - 20),
           ("s7", "follow", 10, NOW - 25)]  # s7 arrives after the later unfollow: stale, ignored
    for eid, action, author, ts in soc:
        bus.publish("engagements", SocialGraphEvent(event_id=eid, action=action, user_id=1, author_id=author,
                                                    event_ts=_dt(ts)))
    bus.publish("engagements", _eng("h1", "hate", NOW - 5, author=11))
    bus.publish("engagements", _eng("f1", "follow", NOW - 4, author=12))
    proc = _proc(redis_client, bus)
    proc.run_once(count=100)
    members = lambda k: {int(m) for m in redis_client.smembers(k)}  # noqa: E731
    assert members(keys.follows(1)) == {7, 12}
    assert members(keys.blocked_authors(1)) == {8}
    assert members(keys.muted_authors(1)) == {9}
    assert members(keys.hated_authors(1)) == {11}
    assert proc.stats["stale"] == 1 and _pending(redis_client) == 0


def test_user_recent_is_capped_and_run_stops_on_event(redis_client):
    bus = RedisStreamsBus(redis_client)
    for i in range(55):
        bus.publish("engagements", _eng(f"r{i}", "click", NOW - 1000 + i, post=1000 + i, author=i % 60))
    bus.publish("engagements", _eng("imp", "impression", NOW, post=5000, author=77))  # not an engagement
    proc = _proc(redis_client, bus)
    stop = threading.Event()
    t = threading.Thread(target=proc.run, args=(stop,), kwargs={"count": 20, "block_ms": 50})
    t.start()
    try:
        for _ in range(100):
            if proc.stats["applied"] == 56:
                break
            stop.wait(0.05)
    finally:
        stop.set()
        t.join(timeout=5)
    assert not t.is_alive() and proc.stats["applied"] == 56
    posts, authors = RealtimeFeatureReader(redis_client).user_recent(1)
    assert posts == [1000 + i for i in range(54, 4, -1)]
    assert len(authors) == 50 and authors[0] == 54 and 77 not in authors


def test_trending_posts_and_tags_match_the_closed_form_and_coverage_starts_near_the_first_event(redis_client):
    bus = RedisStreamsBus(redis_client)
    redis_client.hset(keys.POST_META, mapping={
        "10": keys.encode_post_meta(7, 0, [3, 5]), "11": keys.encode_post_meta(8, 0, [5]),
        "12": keys.encode_post_meta(9, 0, [])})
    rng = random.Random(11)
    kinds = ["click", "like", "long_view", "impression", "hate", "follow"]
    events = [_eng(f"t{i}", rng.choice(kinds), NOW - rng.uniform(0, 20_000), post=rng.choice([10, 11, 12, 13]))
              for i in range(300)]
    for e in events:
        bus.publish("engagements", e)
    assert _proc(redis_client, bus).run_once(count=500) > 0
    reader = RealtimeFeatureReader(redis_client)
    half = rt.TRENDING_HALF_LIFE_S

    def closed(keep):
        return sum(rt.kind_weight(e.kind) * 2 ** (-(NOW - e.event_ts.timestamp()) / half) for e in events if keep(e))

    posts = reader.trending(NOW, k=10)
    want = {p: closed(lambda e, p=p: e.post_id == p) for p in (10, 11, 12, 13)}
    assert [p for p, _ in posts] == sorted(want, key=want.get, reverse=True)
    assert dict(posts) == pytest.approx(want, rel=1e-9)
    tags = dict(reader.trending(NOW, k=10, entity="tag"))
    assert tags == pytest.approx({3: want[10], 5: want[10] + want[11]}, rel=1e-9)  # post 13 has no meta
    # published in random time order: coverage reaches back to the earliest event within
    # OUT_OF_ORDER_S of the first one applied, not to the earliest overall
    first = events[0].event_ts.timestamp()
    want = min(t for t in (e.event_ts.timestamp() for e in events) if t >= first - rt.OUT_OF_ORDER_S)
    assert reader.coverage_since() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="entity"):
        reader.trending(NOW, entity="author")


def test_metrics_export_lag_outcomes_and_consumer_backlog(redis_client):
    from prometheus_client.parser import text_string_to_metric_families

    bus = RedisStreamsBus(redis_client)
    events = [_eng(f"m{i}", "click", NOW - 10 * i) for i in range(30)]
    for e in events:
        bus.publish("engagements", e)
    bus.publish("engagements", events[0])  # a redelivered duplicate
    proc = _proc(redis_client, bus)
    assert proc.refresh_backlog().lag == 31  # nothing delivered yet
    proc.run_once(count=20)
    b = proc.refresh_backlog()
    assert (b.lag, b.pending, b.dead_letters) == (11, 0, 0)
    proc.run_once(count=20)
    proc.refresh_backlog()

    def samples():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(proc.metrics.render().decode()) for s in fam.samples}

    got = samples()
    topic = (("topic", "engagements"),)
    assert got[("hm_stream_events_total", (("outcome", "applied"), *topic))] == 30
    assert got[("hm_stream_events_total", (("outcome", "duplicate"), *topic))] == 1
    assert got[("hm_stream_event_to_online_seconds_count", topic)] == 30
    # lag = write (NOW + 1) - event time, i.e. 1 s .. 291 s here
    assert got[("hm_stream_event_to_online_seconds_sum", topic)] == pytest.approx(sum(1 + 10 * i for i in range(30)))
    p50, p99 = proc.lag_percentiles()
    assert got[("hm_stream_event_to_online_p50_seconds", topic)] == pytest.approx(p50) == pytest.approx(146.0)
    assert got[("hm_stream_event_to_online_p99_seconds", topic)] == pytest.approx(p99)
    group = (("group", "feature-writer"), *topic)
    assert got[("hm_stream_consumer_lag_entries", group)] == 0
    assert got[("hm_stream_pending_entries", group)] == 0


def test_coverage_ignores_stragglers_and_events_from_a_skewed_clock(redis_client):
    bus = RedisStreamsBus(redis_client)
    for i in range(5):
        bus.publish("engagements", _eng(f"cv{i}", "click", NOW - 100 * (5 - i)))
    reader = RealtimeFeatureReader(redis_client)
    proc = _proc(redis_client, bus)
    proc.run_once(count=10)
    cov = reader.coverage()
    assert (cov.since, cov.newest, cov.first) == (NOW - 500, NOW - 100, NOW - 500)
    # a straggler two days old counts in no window; one 2 h before the first event is a single
    # late event, not proof that the stream holds those 2 h: neither claims coverage back to it
    bus.publish("engagements", _eng("old", "click", NOW - 2 * 86400))
    bus.publish("engagements", _eng("late", "click", NOW - 500 - 2 * rt.OUT_OF_ORDER_S))
    # ordinary out-of-order delivery, 5 min before the first event, extends it
    bus.publish("engagements", _eng("near", "click", NOW - 500 - 300))
    # a day ahead of the processor's clock (a skewed producer): applied, but moves no coverage and
    # does not push the post's real buckets out of its 24 h window
    bus.publish("engagements", _eng("ahead", "click", NOW + 86400))
    assert proc.run_once(count=10) == 4
    cov = reader.coverage()
    assert (cov.since, cov.newest, cov.first) == (NOW - 800, NOW - 100, NOW - 500)
    events = [_eng(f"cv{i}", "click", NOW - 100 * (5 - i)) for i in range(5)] + [
        _eng("late", "click", NOW - 500 - 2 * rt.OUT_OF_ORDER_S), _eng("near", "click", NOW - 800)]
    assert reader.post_window_counts([10], NOW)[10] == pytest.approx(
        {**reader.post_window_counts([10], NOW)[10], **_expected_windows(events, 10, NOW)})
    assert reader.post_window_counts([10], NOW)[10]["rt_clicks_24h"] == 7


def test_entries_trimmed_before_the_group_read_them_are_reported_and_restart_coverage(redis_client):
    bus = RedisStreamsBus(redis_client, maxlen=100)
    proc = _proc(redis_client, bus)
    bus.publish("engagements", _eng("t0", "click", NOW - 3000))
    proc.run_once(count=10)
    assert proc.refresh_backlog().lag == 0 and bus.skip_trimmed("engagements", "feature-writer") == 0
    # the processor is down while 1000 events flow into a stream capped at ~100 entries
    for i in range(1000):
        bus.publish("engagements", _eng(f"t{i + 1}", "click", NOW - 1000 + i))
    retained = redis_client.xlen(keys.event_stream("engagements"))
    assert retained < 1000
    proc.run_once(count=2000)
    assert proc.stats["lost"] == 1000 - retained and proc.stats["applied"] == 1 + retained
    dead = bus.dead_letters("engagements")
    assert len(dead) == 1 and dead[0].reason.startswith(f"{1000 - retained} entries were trimmed")
    # coverage restarts at the first event after the gap; the group's lag is exact again
    assert RealtimeFeatureReader(redis_client).coverage().since == NOW - 1000 + (1000 - retained)
    assert proc.refresh_backlog().lag == 0
    assert bus.skip_trimmed("engagements", "feature-writer") == 0


def test_caught_up_is_the_oldest_entry_the_group_has_not_applied(redis_client):
    """The liveness stamp is on the Redis clock: the stream id (ms) of the oldest entry that is
    undelivered or pending in the group, or the server time once there is none."""
    bus = RedisStreamsBus(redis_client)
    reader = RealtimeFeatureReader(redis_client)

    def publish(eid, **kw) -> float:
        time.sleep(0.003)  # distinct stream-id milliseconds
        return int(bus.publish("engagements", _eng(eid, "click", NOW - 10, **kw)).split("-")[0]) / 1000

    ids = [publish(f"lv{i}") for i in range(5)]
    proc = _proc(redis_client, bus, reclaim_every_s=0.0, reclaim_idle_ms=0, stamp_every_s=0.0)
    proc.run_once(count=2)  # stamped before its XACK: the batch itself is not claimed yet
    assert reader.coverage().caught_up == ids[0]
    proc.run_once(count=2)
    assert reader.coverage().caught_up == ids[2]
    proc.run_once(count=10)
    time.sleep(0.003)
    proc.run_once(count=10)  # nothing left: the server's time
    cov = reader.coverage()
    assert ids[4] < cov.caught_up <= cov.server_now and cov.staleness_s < 1.0

    # a write that fails leaves its entry pending: the stamp stays before it while time passes
    redis_client.set(keys.rt_post_counts(99), "not a hash")
    bad = publish("bad", post=99)
    proc.run_once(count=10)
    proc.run_once(count=10)
    assert proc.stats["failed"] >= 1 and reader.coverage().caught_up == bad
    time.sleep(0.05)
    assert reader.coverage().staleness_s >= 0.05
    redis_client.delete(keys.rt_post_counts(99))
    proc.run_once(count=10)  # reclaimed (idle >= 0 ms) and applied: caught up again
    cov = reader.coverage()
    assert cov.caught_up > bad and cov.staleness_s < 1.0 and _pending(redis_client) == 0

    # a peer that read an entry and died holds the stamp too, until the entry is reclaimed
    held = publish("held")
    assert len(bus.consume("engagements", "feature-writer", "dead-peer", count=1)) == 1
    slow = _proc(redis_client, bus, name="c2", stamp_every_s=0.0)  # reclaims only entries idle 30 s
    slow.run_once(count=10)
    slow.run_once(count=10)
    assert reader.coverage().caught_up == held
    time.sleep(0.003)
    proc.run_once(count=10)
    assert reader.coverage().caught_up > held and _pending(redis_client) == 0
    # a busy processor stamps at most every stamp_every_s
    throttled = _proc(redis_client, bus, name="c3", stamp_every_s=3600.0)
    throttled.run_once(count=10)
    stamped = reader.coverage().caught_up
    publish("later")
    throttled.run_once(count=10)
    throttled.run_once(count=10)
    assert reader.coverage().caught_up == stamped and throttled.stats["applied"] == 1


def test_trending_read_stays_finite_for_events_stamped_far_ahead_of_the_reader_clock(redis_client):
    # a live replay stamps wall-clock time while a mixer may read on a pinned 2022 clock
    bus = RedisStreamsBus(redis_client)
    ahead = NOW + 5 * 365 * 86400
    for i, (kind, post) in enumerate([("like", 20), ("like", 20), ("click", 21)]):
        bus.publish("engagements", _eng(f"f{i}", kind, ahead, post=post))
    _proc(redis_client, bus).run_once(count=10)
    got = RealtimeFeatureReader(redis_client).trending(NOW, k=5)
    assert [p for p, _ in got] == [20, 21]
    assert all(math.isfinite(s) and s > 0 for _, s in got)
    # read on the events' own clock the closed form holds again
    later = dict(RealtimeFeatureReader(redis_client).trending(ahead, k=5))
    assert later[20] == pytest.approx(2 * rt.kind_weight("like"), rel=1e-9)


def test_the_liveness_stamp_comes_from_the_bus_applied_until(redis_client):
    """The processor asks the bus (``EventBus.applied_until``), not Redis stream internals, so any
    bus (Kafka: committed offsets) works; the stamp only moves forward, up to the Redis clock."""

    class OtherBus:  # another EventBus implementation: a Redis bus with its own notion of applied-until
        def __init__(self, inner):
            self.inner, self.value = inner, None

        def applied_until(self, topic, group):
            return self.value

        def __getattr__(self, name):
            return getattr(self.inner, name)

    bus = OtherBus(RedisStreamsBus(redis_client))
    reader = RealtimeFeatureReader(redis_client)
    proc = _proc(redis_client, bus, stamp_every_s=0.0)
    proc.run_once(count=10)  # None: no stamp (logged), nothing written
    assert reader.coverage().caught_up is None
    secs, _ = redis_client.time()
    bus.value = secs - 100.25
    proc.run_once(count=10)
    assert reader.coverage().caught_up == secs - 100.25
    bus.value = secs - 200.0  # a peer's older value does not move it back
    proc.run_once(count=10)
    assert reader.coverage().caught_up == secs - 100.25
    redis_client.hset(keys.RT_COVERAGE, "caught_up", secs + 3600)  # ahead of the clock: replaced
    proc.run_once(count=10)
    assert reader.coverage().caught_up == secs - 200.0
