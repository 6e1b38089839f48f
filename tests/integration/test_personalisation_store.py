"""The history path on a real Redis and a real local Spark: co-engagement neighbours (Spark job),
the candidate index's action sequences and neighbour lists, the action-sequence query hydrator
(batch history merged with the stream processor's live list) and the co-engagement source."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import redis

from core import online_layout as keys
from core.schema import IMPRESSIONS_COLUMNS, POSTS_COLUMNS, PRELOG_EVENTS_COLUMNS, SOCIAL_EDGES_COLUMNS
from mixer.candidate import EngagedAction, Query
from mixer.candidate_sources import CoEngagementCandidateSource
from mixer.candidate_sources.coengagement import read_neighbours
from mixer.caches import CacheSettings, MixerCaches
from mixer.components import Fallback
from mixer.query_hydrators import UserActionSequenceQueryHydrator
from mixer.redis_health import RedisHealth
from pipelines.candidate_index import CanonicalTables, build_coengagement, compute_candidate_index, write_candidate_index
from pipelines.coengagement import coengagement_neighbours

pytestmark = pytest.mark.integration

T0 = pd.Timestamp("2022-04-26T00:00:00Z")
AS_OF = T0 + pd.Timedelta(hours=5)


def imp(user, post, minutes, **labels) -> dict:
    row = {c: 0 for c in IMPRESSIONS_COLUMNS}
    return row | {"user_id": user, "post_id": post, "author_id": 1000 + post,
                  "event_ts": T0 + pd.Timedelta(minutes=minutes), "date": 20220426} | labels


def tables() -> CanonicalTables:
    rows = []
    # users 1..3 engage 1 -> 2 -> 3 in a row; user 4 engages 3 -> 4; user 5 engages 2 after the cutoff
    for u in (1, 2, 3):
        rows += [imp(u, 1, 10 * u, long_view=1), imp(u, 2, 10 * u + 1, like=1), imp(u, 3, 10 * u + 2, long_view=1)]
    rows += [imp(4, 3, 50, long_view=1), imp(4, 4, 51, comment=1), imp(4, 9, 52, click=1)]
    rows += [imp(5, 2, 60 * 6, long_view=1), imp(5, 5, 60 * 6 + 1, long_view=1)]
    posts = pd.DataFrame([{"post_id": p, "author_id": 1000 + p, "created_ts": T0 - pd.Timedelta(days=1),
                           "duration_ms": 1000, "video_type": "NORMAL", "tags": "7", "primary_tag": 7}
                          for p in (1, 2, 3, 4, 5, 9)], columns=list(POSTS_COLUMNS))
    prelog = pd.DataFrame([{"user_id": 6, "post_id": p, "author_id": 1000 + p, "tag_id": 7,
                            "event_ts": T0 - pd.Timedelta(hours=1), "kind": "long_view", "position": i}
                           for i, p in enumerate((4, 3))], columns=list(PRELOG_EVENTS_COLUMNS))
    edges = pd.DataFrame({c: pd.Series(dtype="int64") for c in SOCIAL_EDGES_COLUMNS}).astype(
        {"event_ts": "datetime64[us, UTC]", "edge_type": "string", "weight": "float64"})
    return CanonicalTables(impressions=pd.DataFrame(rows), posts=posts, social_edges=edges, prelog_events=prelog)


def test_spark_neighbours_are_the_iuf_weighted_cosine(spark):
    seq = pd.DataFrame({"user_id": [1, 1, 1, 2, 2], "post_id": [1, 2, 3, 2, 3], "ts": [0.0, 1, 2, 0, 1]})
    out = coengagement_neighbours(spark, seq, servable_posts=[1, 2, 3], window=1, top_n=5, log=None)
    got = {(int(a), int(b)): s for a, b, s in out.itertuples(index=False)}
    w1, w2 = 1 / math.log2(2 + 3), 1 / math.log2(2 + 2)
    # 2-3 co-occur for both users; 1-2 for user 1 only; 1-3 are two apart (window 1): no pair
    assert got[(2, 3)] == pytest.approx((w1 + w2) / math.sqrt(2 * 2))
    assert got[(3, 2)] == got[(2, 3)]
    assert got[(1, 2)] == pytest.approx(w1 / math.sqrt(1 * 2))
    assert (1, 3) not in got
    assert out.groupby("post_id")["score"].apply(lambda s: s.is_monotonic_decreasing).all()
    top1 = coengagement_neighbours(spark, seq, servable_posts=[1, 2, 3], window=1, top_n=1, log=None)
    assert top1.groupby("post_id").size().max() == 1 and set(top1.loc[top1.post_id == 2, "neighbour_id"]) == {3}
    not_servable = coengagement_neighbours(spark, seq, servable_posts=[1, 2], window=1, top_n=5, log=None)
    assert 3 not in set(not_servable["neighbour_id"])
    with pytest.raises(ValueError, match=">= 1"):
        coengagement_neighbours(spark, seq, [1], window=0)


@pytest.fixture()
def store(spark, redis_client):
    t = tables()
    neighbours = build_coengagement(spark, t, AS_OF, log=None)
    content = compute_candidate_index(t, AS_OF, neighbours, sequence_length=2)
    write_candidate_index(redis_client, content)
    return redis_client, content


def test_index_holds_point_in_time_sequences_and_neighbours(store):
    client, content = store
    # user 1's last 2 engagements, newest first, with author and action
    members = client.zrevrange(keys.action_sequence(1), 0, -1)
    assert [keys.decode_action(m) for m in members] == [(3, 1003, "long_view"), (2, 1002, "like")]
    assert client.zcard(keys.action_sequence(6)) == 2  # the pre-log history counts
    assert not client.exists(keys.action_sequence(5))  # engaged only after the cutoff
    ids3, sims3 = keys.decode_neighbours(client.get(keys.coengagement(3)))
    assert set(ids3.tolist()) == {1, 2, 4}  # 5 co-occurs with 2 only after the cutoff
    assert (np.diff(sims3) <= 0).all() and (sims3 > 0).all()  # best first
    expect = content.coengagement[content.coengagement["post_id"] == 3]
    assert dict(zip(ids3.tolist(), sims3.tolist())) == dict(zip(expect["neighbour_id"], expect["score"]))
    assert 5 not in keys.decode_neighbours(client.get(keys.coengagement(2)))[0]
    # the top n of a list are its first n records: what the mixer reads (one GETRANGE per seed)
    top1 = read_neighbours(client, [3, 999], 1)
    assert top1[3][0].tolist() == ids3[:1].tolist() and len(top1[999][0]) == 0
    # an index of the older layout (zsets) is named, with what to do
    client.delete(keys.coengagement(3))
    client.zadd(keys.coengagement(3), {"1": 0.5})
    with pytest.raises(ValueError, match="rebuild it"):
        read_neighbours(client, [3], 10)
    assert content.counts()["coengagement_posts"] == 4 and content.counts()["sequence_users"] == 5


def test_stream_appends_live_engagements_once_and_the_source_expands_them(store):
    client, _ = store
    hydrator = UserActionSequenceQueryHydrator(client, max_length=3)
    q = hydrator.hydrate(Query(user_id=1, page_size=10, now_s=0.0, request_id="r"))
    assert [a.post_id for a in q.action_sequence] == [3, 2]
    # the real stream processor applies user 1's live engagements: a like of 4, a click of 5 (not
    # an engagement), a long view and then a like of 2; a redelivered event is applied once
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.events import EngagementEvent
    from pipelines.streaming.processor import StreamProcessor

    now = AS_OF.timestamp()
    bus = RedisStreamsBus(client)
    for eid, kind, post, dt in [("a", "like", 4, 10), ("b", "click", 5, 11), ("c", "long_view", 2, 12),
                                ("d", "like", 2, 12), ("a", "like", 4, 10)]:
        bus.publish("engagements", EngagementEvent(event_id=eid, kind=kind, user_id=1, post_id=post,
                                                   author_id=1000 + post,
                                                   event_ts=pd.Timestamp(now + dt, unit="s", tz="UTC").to_pydatetime()))
    proc = StreamProcessor(client, bus, clock=lambda: now + 20)
    while proc.run_once(count=10, block_ms=10):
        pass
    assert proc.stats["applied"] == 4  # the redelivered like of 4 is not applied twice
    # index: 3 long_view, 2 like; live: 4 like, 2 long_view (2 like only moves forward in time)
    assert client.zcard(keys.action_sequence(1)) == 4
    q = hydrator.hydrate(Query(user_id=1, page_size=10, now_s=0.0, request_id="r"))
    assert [(a.post_id, a.author_id, a.action) for a in q.action_sequence] == [
        (2, 1002, "like"), (4, 1004, "like"), (3, 1003, "long_view")]
    # a rebuild of the index as of the same cutoff keeps what the processor appended since (those
    # events are marked applied and will not come again)
    write_candidate_index(client, store[1])
    again = hydrator.hydrate(Query(user_id=1, page_size=10, now_s=0.0, request_id="r"))
    assert again.action_sequence == q.action_sequence
    empty = hydrator.hydrate(Query(user_id=99, page_size=10, now_s=0.0, request_id="r"))
    assert empty.action_sequence == ()

    caches = MixerCaches(CacheSettings())
    source = CoEngagementCandidateSource(client, max_candidates=10, seed_posts=2, caches=caches)
    cands = source.fetch(Query(user_id=7, page_size=10, now_s=0.0, request_id="r",
                               action_sequence=(EngagedAction(3, 1003, "long_view", 2.0),
                                                EngagedAction(2, 1002, "like", 1.0))))
    ids = [c.post_id for c in cands]
    assert 3 not in ids and 2 not in ids  # the user's own engagements are not candidates
    scores = {c.post_id: c.source_score for c in cands}
    sim_to_1 = {seed: dict(zip(*(a.tolist() for a in keys.decode_neighbours(client.get(keys.coengagement(seed))))))[1]
                for seed in (3, 2)}
    expect_1 = sim_to_1[3] + sim_to_1[2]
    assert scores[1] == pytest.approx(expect_1) and ids[0] == 1  # neighbour of both seeds leads
    assert all(c.source == "coengagement" for c in cands)
    assert source.fetch(Query(user_id=7, page_size=10, now_s=0.0, request_id="r")) == []

    # Redis down: the cached seeds still answer (degraded); the hydrator serves without a sequence
    health = RedisHealth()
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    down_source = CoEngagementCandidateSource(dead, max_candidates=10, seed_posts=2, caches=caches, health=health)
    with pytest.raises(Fallback) as fb:
        down_source.fetch(Query(user_id=7, page_size=10, now_s=0.0, request_id="r",
                                action_sequence=(EngagedAction(3, 1003, "long_view", 2.0),
                                                 EngagedAction(9, 1009, "like", 1.0))))
    assert {c.post_id for c in fb.value.value} == {1, 2, 4}  # 3's cached list; 9 was never read
    with pytest.raises(Fallback) as fq:
        UserActionSequenceQueryHydrator(dead, health=health).hydrate(Query(1, 10, 0.0, "r"))
    assert fq.value.value.action_sequence is None  # unknown, not "no history"


def test_whole_funnel_refuses_to_flush_a_serving_store(redis_client, tmp_path):
    """The as-of store is flushed before it is built: a database a mixer served from is refused."""
    from core.state import StateDir
    from home_mixer.whole_funnel import prepare_as_of_store

    redis_client.xadd(keys.SERVED_IMPRESSIONS, {"post_id": 1})
    redis_client.set("canary", 1)
    url = redis_client.connection_pool.connection_kwargs
    with pytest.raises(ValueError, match="serving store"):
        prepare_as_of_store(StateDir(tmp_path).ensure(), f"redis://{url['host']}:{url['port']}/{url['db']}", "127.0.0.1:0",
                            AS_OF, spark=None, log=lambda line: None)
    assert redis_client.get("canary") == b"1"  # nothing was flushed
