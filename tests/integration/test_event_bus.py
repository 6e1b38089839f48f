"""The Redis Streams event bus on a real redis-server: groups, acks, reclaim, dead letters, cap."""

import json
import time
from datetime import datetime, timezone

import pytest

from core import online_layout as keys
from pipelines.streaming.bus import EventBus, RedisStreamsBus
from pipelines.streaming.events import EngagementEvent, SocialGraphEvent, encode_event

pytestmark = pytest.mark.integration

TS = datetime(2022, 5, 1, 12, tzinfo=timezone.utc)


def _ev(i: int) -> EngagementEvent:
    return EngagementEvent(event_id=f"e{i}", kind="click", user_id=i, post_id=100 + i, author_id=7, event_ts=TS)


def _pending(client, topic, group) -> int:
    return client.xpending(keys.event_stream(topic), group)["pending"]


def test_publish_consume_ack_in_order_and_groups_are_independent(redis_client):
    bus = RedisStreamsBus(redis_client, maxlen=1000)
    assert isinstance(bus, EventBus)
    events = [_ev(i) for i in range(5)]
    ids = [bus.publish("engagements", e) for e in events]
    got = bus.consume("engagements", "features", "c1", count=10)
    assert [d.id for d in got] == ids and [d.event for d in got] == events
    assert all(d.delivery_count == 1 and d.fields == encode_event(d.event) for d in got)
    assert _pending(redis_client, "engagements", "features") == 5
    for d in got[:3]:
        bus.ack(d)
    assert _pending(redis_client, "engagements", "features") == 2
    assert bus.consume("engagements", "features", "c2", count=10) == []  # nothing new for the group
    # another group (created after the publishes) still sees every event from the start
    assert [d.event for d in bus.consume("engagements", "index", "c1")] == events


def test_consume_blocks_up_to_block_ms_and_creates_the_stream(redis_client):
    bus = RedisStreamsBus(redis_client)
    t0 = time.monotonic()
    assert bus.consume("empty", "g", "c", block_ms=200) == []
    assert 0.15 < time.monotonic() - t0 < 2.0
    assert redis_client.exists(keys.event_stream("empty"))
    bus.ensure_group("empty", "g")  # idempotent: BUSYGROUP is not an error
    RedisStreamsBus(redis_client).ensure_group("empty", "g")


def test_unacked_delivery_of_a_crashed_consumer_is_reclaimed_after_min_idle(redis_client):
    bus = RedisStreamsBus(redis_client)
    ids = [bus.publish("engagements", _ev(i)) for i in range(3)]
    crashed = bus.consume("engagements", "features", "crashed", count=10)
    bus.ack(crashed[0])  # it processed one event, then died before acking the other two
    assert bus.reclaim("engagements", "features", "rescuer", min_idle_ms=60_000) == []  # not idle long enough
    time.sleep(0.15)
    rescued = bus.reclaim("engagements", "features", "rescuer", min_idle_ms=100)
    assert [d.id for d in rescued] == ids[1:]
    assert [d.event for d in rescued] == [d.event for d in crashed[1:]]
    assert all(d.delivery_count == 2 for d in rescued)
    owners = {r["consumer"].decode() for r in redis_client.xpending_range(
        keys.event_stream("engagements"), "features", min="-", max="+", count=10)}
    assert owners == {"rescuer"}
    for d in rescued:
        bus.ack(d)
    assert _pending(redis_client, "engagements", "features") == 0


def test_a_consumer_gets_its_own_unacked_entries_back_and_no_one_elses(redis_client):
    bus = RedisStreamsBus(redis_client, max_deliveries=2)
    ids = [bus.publish("engagements", _ev(i)) for i in range(5)]
    mine = bus.consume("engagements", "features", "me", count=3)
    other = bus.consume("engagements", "features", "other", count=10)
    bus.ack(mine[1])
    again = bus.consume_own_pending("engagements", "features", "me", count=1)  # pages through all
    assert [d.id for d in again] == [ids[0], ids[2]] and [d.event for d in again] == [mine[0].event, mine[2].event]
    assert bus.consume("engagements", "features", "me") == []  # ">" never returns them
    assert [d.id for d in bus.consume_own_pending("engagements", "features", "other")] == [d.id for d in other]
    # read a third time: over max_deliveries, a poison entry goes to the dead letters
    assert bus.consume_own_pending("engagements", "features", "me") == []
    assert {dl.original_id for dl in bus.dead_letters("engagements")} == {ids[0], ids[2]}
    bus.ack_many(other)
    assert _pending(redis_client, "engagements", "features") == 0


def test_malformed_entries_go_to_dead_letters_while_valid_ones_flow(redis_client):
    bus = RedisStreamsBus(redis_client)
    key = keys.event_stream("engagements")
    good1 = bus.publish("engagements", _ev(1))
    bad_json = redis_client.xadd(key, {b"event": b"{oops", b"type": b"engagement"}).decode()
    bad_field = redis_client.xadd(key, {b"payload": b"\xff\x00"}).decode()
    naive = _ev(2).model_dump(mode="json") | {"event_ts": "2022-05-01T00:00:00"}
    bad_ts = redis_client.xadd(key, {b"event": json.dumps(naive).encode(), b"type": b"engagement"}).decode()
    good2 = bus.publish("engagements", _ev(3))

    got = bus.consume("engagements", "features", "c1", count=10)
    assert [d.id for d in got] == [good1, good2]
    dead = bus.dead_letters("engagements")
    assert [d.original_id for d in dead] == [bad_json, bad_field, bad_ts]
    assert "not valid JSON" in dead[0].reason and dead[0].fields == {b"event": b"{oops", b"type": b"engagement"}
    assert "no 'event' field" in dead[1].reason and dead[1].fields == {b"payload": b"\xff\x00"}  # bytes kept as-is
    assert "event_ts" in dead[2].reason and "timezone" in dead[2].reason
    assert all(d.group == "features" and d.original_topic == "engagements" for d in dead)
    # dead-lettered entries are acked; only the two valid ones wait for the consumer's ack
    assert _pending(redis_client, "engagements", "features") == 2


def test_consumer_can_dead_letter_an_event_it_cannot_process(redis_client):
    bus = RedisStreamsBus(redis_client)
    ev = SocialGraphEvent(event_id="s1", action="block", user_id=1, author_id=2, event_ts=TS)
    bus.publish("social", ev)
    (d,) = bus.consume("social", "g", "c")
    bus.dead_letter(d, "unknown author 2")
    (dl,) = bus.dead_letters("social")
    assert dl.reason == "unknown author 2" and dl.original_id == d.id and dl.fields == d.fields
    assert _pending(redis_client, "social", "g") == 0
    with pytest.raises(ValueError, match="needs a reason"):
        bus.dead_letter(d, "")


def test_poison_entry_is_dead_lettered_after_max_deliveries(redis_client):
    bus = RedisStreamsBus(redis_client, max_deliveries=2)
    bus.publish("engagements", _ev(1))
    assert len(bus.consume("engagements", "g", "c1")) == 1  # delivery 1, consumer crashes
    time.sleep(0.03)
    assert len(bus.reclaim("engagements", "g", "c2", min_idle_ms=10)) == 1  # delivery 2, crashes again
    time.sleep(0.03)
    assert bus.reclaim("engagements", "g", "c3", min_idle_ms=10) == []  # delivery 3 > 2: dead letter
    (dl,) = bus.dead_letters("engagements")
    assert "delivered 3 times" in dl.reason
    assert _pending(redis_client, "engagements", "g") == 0


def test_entry_trimmed_while_pending_is_reported_not_lost_silently(redis_client):
    bus = RedisStreamsBus(redis_client)
    first = bus.publish("engagements", _ev(1))
    bus.consume("engagements", "g", "crashed")
    redis_client.xtrim(keys.event_stream("engagements"), maxlen=0)  # a cap removed it before any ack
    time.sleep(0.03)
    assert bus.reclaim("engagements", "g", "rescuer", min_idle_ms=10) == []
    (dl,) = bus.dead_letters("engagements")
    assert dl.original_id == first and "trimmed" in dl.reason and dl.fields == {}


def test_length_cap_holds_approximately(redis_client):
    maxlen = 200
    bus = RedisStreamsBus(redis_client, maxlen=maxlen)
    n = 2000
    pipe_ids = [bus.publish("capped", _ev(i)) for i in range(n)]
    length = redis_client.xlen(keys.event_stream("capped"))
    # MAXLEN ~ trims whole macro nodes (stream-node-max-entries, 100 by default)
    node = int(redis_client.config_get("stream-node-max-entries")["stream-node-max-entries"])
    assert maxlen <= length <= maxlen + node
    newest = redis_client.xrevrange(keys.event_stream("capped"), count=1)[0][0].decode()
    assert newest == pipe_ids[-1]  # the cap drops the oldest entries, never the newest


def test_bad_arguments_are_clear_errors(redis_client):
    import redis

    with pytest.raises(ValueError, match="maxlen must be >= 1"):
        RedisStreamsBus(redis_client, maxlen=0)
    bus = RedisStreamsBus(redis_client)
    with pytest.raises(ValueError, match="bad topic"):
        bus.publish("a:b", _ev(1))
    with pytest.raises(TypeError, match="expected an event model"):
        bus.publish("t", {"type": "engagement"})
    decoding = redis.Redis(connection_pool=redis.ConnectionPool(
        **{**redis_client.get_connection_kwargs(), "decode_responses": True}))
    with pytest.raises(ValueError, match="decode_responses=False"):
        RedisStreamsBus(decoding)


def test_applied_until_is_the_oldest_entry_the_group_has_not_acknowledged(redis_client):
    """``EventBus.applied_until``: on the Redis clock (stream ids are server ms), the time of the
    oldest entry undelivered to or pending in the group, or the server time when there is none;
    ``None`` without the stream or the group. Dead-lettered entries count as acknowledged."""
    bus = RedisStreamsBus(redis_client)
    assert bus.applied_until("engagements", "g") is None  # no stream
    assert not redis_client.exists(keys.event_stream("engagements"))  # and the read created none

    def publish(event) -> float:
        time.sleep(0.003)  # distinct stream-id milliseconds
        return int(bus.publish("engagements", event).split("-")[0]) / 1000

    def server_now() -> float:
        secs, micros = redis_client.time()
        return secs + micros / 1e6

    first = publish(_ev(0))
    assert bus.applied_until("engagements", "g") is None  # no group yet
    bus.ensure_group("engagements", "g")
    assert bus.applied_until("engagements", "g") == first  # undelivered
    ts = [first] + [publish(_ev(i)) for i in range(1, 4)]
    got = bus.consume("engagements", "g", "c1", count=2)
    assert bus.applied_until("engagements", "g") == ts[0]  # delivered, pending
    bus.ack(got[0])
    assert bus.applied_until("engagements", "g") == ts[1]
    bus.ack(got[1])
    assert bus.applied_until("engagements", "g") == ts[2]  # the oldest undelivered again
    rest = bus.consume("engagements", "g", "c2", count=10)
    bus.dead_letter(rest[0], "cannot process")  # acknowledged with its dead letter
    assert bus.applied_until("engagements", "g") == ts[3]
    bus.ack(rest[1])
    before, until, after = server_now(), bus.applied_until("engagements", "g"), server_now()
    assert ts[3] < until and before - 0.001 <= until <= after  # nothing left: the server's time (ms)
    assert until == round(until, 3)
    # groups are independent: a new one starts before everything it has not read
    bus.ensure_group("engagements", "other")
    assert bus.applied_until("engagements", "other") == ts[0]
