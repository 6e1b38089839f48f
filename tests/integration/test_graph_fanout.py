"""The social graph and fan-out against a real Redis, and a real fan-out worker process SIGKILLed
mid-post (issue 20, must-haves 1 and 2).

- Social events through the stream processor land in both directions, idempotently by event id;
  stale ones are ignored; a block ends both directions; a follow backfills the followee's posts.
- A bulk load of an edge list is idempotent and its counts are right.
- Fan-out pushes a post into every follower's capped timeline once, skips celebrities (own timeline
  only) and treats a redelivered post as a duplicate.
- The read side honours deletes, unfollows, blocks and mutes, and cleans up lazily.
- A worker process SIGKILLed in the middle of a post's pages: a second worker reclaims the post
  (XAUTOCLAIM) and resumes at the checkpoint; every follower has the post exactly once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest

from core import online_layout as keys
from core.state import PROJECT_ROOT, StateDir
from pipelines.graph.config import FanoutSettings
from pipelines.graph.fanout import FanoutWorker
from pipelines.graph.store import SocialGraphStore
from pipelines.graph.timeline import HomeTimelineReader
from pipelines.graph.writer import SocialGraphWriter
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import PostCreatedEvent, PostDeletedEvent, SocialGraphEvent
from pipelines.streaming.processor import StreamProcessor

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def _social(i: int, action: str, user: int, author: int, dt_s: float = 0.0) -> SocialGraphEvent:
    return SocialGraphEvent(event_id=f"s{i}", event_ts=T0 + timedelta(seconds=dt_s or i), action=action,
                            user_id=user, author_id=author)


def _post(post: int, author: int, dt_s: float = 0.0) -> PostCreatedEvent:
    return PostCreatedEvent(event_id=f"p{post}", event_ts=T0 + timedelta(seconds=dt_s or post), post_id=post,
                            author_id=author)


def _members(client, key) -> set[str]:
    return {m.decode() for m in client.smembers(key)}


def _timeline(client, user: int) -> list[str]:
    return [m.decode() for m in client.zrevrange(keys.home_timeline(user), 0, -1)]


# ---------------------------------------------------------------- the graph
def test_social_events_land_in_both_directions_idempotently(redis_client):
    settings = FanoutSettings(backfill_posts=2)
    graph = SocialGraphWriter(redis_client, settings)
    proc = StreamProcessor(redis_client, RedisStreamsBus(redis_client), graph=graph)
    store = SocialGraphStore(redis_client)
    # author 10 has three posts before user 1 follows: the follow backfills the newest two
    worker = FanoutWorker(redis_client, RedisStreamsBus(redis_client), settings)
    for p in (101, 102, 103):
        worker.fan_out(_post(p, 10))
    events = [_social(1, "follow", 1, 10), _social(2, "follow", 2, 10), _social(3, "follow", 1, 11),
              _social(4, "mute", 1, 12)]
    assert proc.apply_many(events) == [True, True, True, True]
    assert proc.apply_many(events) == [False, False, False, False]  # the same event ids: duplicates
    assert _members(redis_client, keys.graph_followers(10)) == {"1", "2"}
    assert _members(redis_client, keys.graph_followees(1)) == {"10", "11"}
    assert store.counts([10, 1, 12]) == [(2, 0), (0, 2), (0, 0)]  # mute changes no edge
    assert _timeline(redis_client, 1) == ["103|10", "102|10"]  # backfilled once, however often delivered
    # an unfollow older than the follow arrives late: stale on both sides, the edge stays
    proc.apply(_social(5, "unfollow", 2, 10, dt_s=1.5))
    assert _members(redis_client, keys.graph_followers(10)) == {"1", "2"}
    # 10 blocks 1: neither follows the other any more (1 -> 10 ends on both sides)
    proc.apply(_social(6, "follow", 10, 1))
    proc.apply(_social(7, "block", 10, 1))
    assert _members(redis_client, keys.graph_followers(10)) == {"2"}
    assert _members(redis_client, keys.graph_followees(1)) == {"11"}
    assert _members(redis_client, keys.graph_followees(10)) == set()
    assert _members(redis_client, keys.graph_followers(1)) == set()
    # social.lua's sets, which the mixer reads today, are kept as before
    assert {m.decode() for m in redis_client.smembers(keys.blocked_authors(10))} == {"1"}


def test_a_failed_graph_half_leaves_the_event_pending_and_the_retry_completes_it(redis_client):
    graph = SocialGraphWriter(redis_client)
    proc = StreamProcessor(redis_client, RedisStreamsBus(redis_client), graph=graph)
    redis_client.set(keys.graph_followers(20), "not a set")  # the author's half fails its type guard
    res = proc.apply_many([_social(1, "follow", 3, 20)])
    assert isinstance(res[0], Exception) and proc.stats["failed"] == 1
    assert _members(redis_client, keys.graph_followees(3)) == {"20"}  # the user's half was applied
    redis_client.delete(keys.graph_followers(20))
    proc.apply_many([_social(1, "follow", 3, 20)])  # the redelivery applies only the missing half
    assert _members(redis_client, keys.graph_followers(20)) == {"3"}
    assert _members(redis_client, keys.graph_followees(3)) == {"20"}


def test_a_bulk_load_is_idempotent_and_counts_both_directions(redis_client):
    store = SocialGraphStore(redis_client)
    follower = np.array([1, 1, 2, 3, 3, 4])
    followee = np.array([2, 3, 3, 1, 3, 3])  # 3 -> 3 is a self-loop: skipped
    seen = []
    assert store.load_edges(follower, followee, batch_members=2, progress=seen.append) == 5
    assert sum(seen) == 10  # both directions
    store.load_edges(follower, followee)
    assert store.counts([1, 2, 3, 4]) == [(1, 2), (1, 1), (3, 1), (0, 1)]
    assert sorted(f for _, page in store.follower_pages(3, page_size=1) for f in page) == [1, 2, 4]
    assert store.clear() > 0 and store.counts([3]) == [(0, 0)]


def test_the_cli_loads_an_edge_list_and_exports_what_redis_holds_after_streamed_changes(
        redis_server, redis_client, tmp_path, monkeypatch, capsys):
    import pyarrow.parquet as pq

    from home_mixer.cli import main

    monkeypatch.setenv("HOME_MIXER_REDIS_URL", redis_server.url)
    edges = tmp_path / "edges.txt"
    edges.write_text("# a SNAP file\n1\t2\n1\t3\n2\t3\n")
    assert main(["--state", str(tmp_path / "state"), "graph", "load", str(edges), "--quiet"]) == 0
    assert SocialGraphStore(redis_client).counts([3]) == [(2, 0)]
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n1 two\n")
    assert main(["--state", str(tmp_path / "state"), "graph", "load", str(bad), "--quiet"]) == 2
    assert "bad.txt:2: expected 'follower followee'" in capsys.readouterr().err
    # a streamed unfollow and follow change the graph; the export sees them
    proc = StreamProcessor(redis_client, RedisStreamsBus(redis_client), graph=SocialGraphWriter(redis_client))
    proc.apply_many([_social(1, "unfollow", 1, 2), _social(2, "follow", 3, 1)])
    assert main(["--state", str(tmp_path / "state"), "graph", "export"]) == 0
    table = pq.read_table(tmp_path / "state" / "tables" / "follow_graph.parquet").to_pandas()
    assert list(zip(table["user_id"], table["author_id"])) == [(1, 3), (2, 3), (3, 1)]


# ---------------------------------------------------------------- fan-out and the read side
def test_fanout_pushes_once_caps_the_timeline_and_skips_celebrities(redis_client):
    settings = FanoutSettings(celebrity_threshold=3, timeline_length=2, page_size=1)
    store = SocialGraphStore(redis_client)
    store.load_edges(np.array([1, 2, 3, 1, 2, 3, 4]), np.array([10, 10, 10, 20, 20, 20, 20]))
    worker = FanoutWorker(redis_client, RedisStreamsBus(redis_client), settings)
    r = worker.fan_out(_post(1, 10))
    assert (r.outcome, r.followers, r.delivered) == ("fanned_out", 3, 3)
    assert worker.fan_out(_post(1, 10)).outcome == "duplicate"  # a redelivery after the ack was lost
    # author 20 has 4 followers > 3: celebrity, own timeline only
    assert worker.fan_out(_post(2, 20)).outcome == "celebrity_skipped"
    assert [m.decode() for m in redis_client.zrange(keys.user_posts(20), 0, -1)] == ["2|20"]
    assert _timeline(redis_client, 4) == []
    for p in (3, 4):
        worker.fan_out(_post(p, 10))
    assert _timeline(redis_client, 1) == ["4|10", "3|10"]  # capped at timeline_length, newest kept
    m = worker.metrics.render().decode()
    assert "hm_fanout_deliveries_total 9.0" in m and 'hm_fanout_posts_total{outcome="celebrity_skipped"} 1.0' in m


def test_a_batch_of_small_posts_fans_out_as_the_posts_one_by_one(redis_client):
    """``process`` writes the one-page posts of a batch in three pipelines; the timelines, counts and
    outcomes are those of fanning the posts out one by one, celebrities and larger posts included."""
    settings = FanoutSettings(celebrity_threshold=5, page_size=3, timeline_length=4)
    # author 10: 3 followers (one page), 20: 4 (two pages), 30: 6 (celebrity), 40: none
    follower = np.array([1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6])
    followee = np.array([10, 10, 10, 20, 20, 20, 20, 30, 30, 30, 30, 30, 30])
    posts = [_post(1, 10), _post(2, 20), _post(3, 30), _post(4, 40), _post(5, 10), _post(1, 10), _post(6, 10)]
    results = {}
    for db, batched in ((1, False), (2, True)):
        client = redis_client.connection_pool.connection_kwargs and type(redis_client)(
            **{**redis_client.connection_pool.connection_kwargs, "db": db})
        client.flushdb()
        SocialGraphStore(client).load_edges(follower, followee)
        bus = RedisStreamsBus(client)
        worker = FanoutWorker(client, bus, settings)
        if batched:
            bus.ensure_group(settings.post_topic, settings.group)
            bus.publish_many([(settings.post_topic, p) for p in posts])
            got = bus.consume(settings.post_topic, settings.group, "c", count=len(posts))
            assert worker.process(got) == len(posts)
            assert bus.consume_own_pending(settings.post_topic, settings.group, "c", 10) == []  # all acked
        else:
            for p in posts:
                worker.fan_out(p)
        results[batched] = ({u: _timeline(client, u) for u in range(1, 7)},
                            {a: [m.decode() for m in client.zrange(keys.user_posts(a), 0, -1)] for a in (10, 20, 30, 40)},
                            dict(worker.stats))
        client.flushdb()
    assert results[True] == results[False]
    timelines, own, stats = results[True]
    assert timelines[1] == ["6|10", "5|10", "2|20", "1|10"]  # capped at 4, newest first
    assert timelines[4] == ["2|20"] and timelines[5] == [] and own[30] == ["3|30"]
    assert stats == {"fanned_out": 5, "celebrity_skipped": 1, "duplicate": 1}


def test_the_bus_drives_fanout_and_the_reader_honours_deletes_unfollows_blocks_and_mutes(redis_client):
    bus = RedisStreamsBus(redis_client)
    settings = FanoutSettings(page_size=2)
    store = SocialGraphStore(redis_client)
    store.load_edges(np.array([1, 1, 1, 1, 2]), np.array([10, 11, 12, 13, 10]))
    worker = FanoutWorker(redis_client, bus, settings)
    bus.publish_many([(settings.post_topic, _post(p, a)) for p, a in ((1, 10), (2, 11), (3, 12), (4, 13), (5, 10))])
    assert worker.run_once(count=10) == 5
    assert worker.refresh_backlog() == 0
    assert _timeline(redis_client, 1) == ["5|10", "4|13", "3|12", "2|11", "1|10"]
    store.delete_post(5, 10)
    redis_client.srem(keys.graph_followees(1), 11)  # as an unfollow leaves it
    reader = HomeTimelineReader(redis_client)
    res = reader.read(1, limit=10, blocked={12}, muted={13})
    assert [(e.post_id, e.author_id) for e in res.entries] == [(1, 10)]
    assert res.hidden == 1
    # lazy cleanup: deleted, unfollowed and blocked entries are gone from the store; the muted one stays
    assert _timeline(redis_client, 1) == ["4|13", "1|10"]
    assert [e.post_id for e in reader.read(2, limit=1).entries] == [1]  # user 2 never saw the deleted 5


def test_a_batch_skips_celebrities_below_the_page_size_and_times_the_bus_lag(redis_client):
    # author 10 has 3 followers: above the threshold (2) though within one page (10), so the batched
    # path must leave it to the celebrity check, as one-by-one would
    settings = FanoutSettings(celebrity_threshold=2, page_size=10)
    SocialGraphStore(redis_client).load_edges(np.array([1, 2, 3, 1]), np.array([10, 10, 10, 20]))
    bus = RedisStreamsBus(redis_client)
    worker = FanoutWorker(redis_client, bus, settings)
    bus.publish_many([(settings.post_topic, _post(1, 10)), (settings.post_topic, _post(2, 20))])
    assert worker.run_once(count=10) == 2
    assert dict(worker.stats) == {"celebrity_skipped": 1, "fanned_out": 1}
    assert _timeline(redis_client, 1) == ["2|20"] and redis_client.zscore(keys.FANOUT_CELEBRITIES, "10") == 3
    m = worker.metrics.render().decode()
    # the bus lag of both (the skip is decided too); seconds, not the weeks since T0
    assert "hm_fanout_delivery_lag_seconds_count 2.0" in m and 'hm_fanout_delivery_lag_seconds_bucket{le="1.0"} 2.0' in m


def test_post_deletes_arrive_on_the_bus_and_are_applied_once(redis_client):
    settings = FanoutSettings(page_size=10)
    SocialGraphStore(redis_client).load_edges(np.array([1, 2, 1]), np.array([10, 10, 20]))
    bus = RedisStreamsBus(redis_client)
    worker = FanoutWorker(redis_client, bus, settings)

    def delete(post, author, dt_s):
        return PostDeletedEvent(event_id=f"d{post}", event_ts=T0 + timedelta(seconds=dt_s), post_id=post,
                                author_id=author)

    bus.publish_many([(settings.post_topic, e) for e in (_post(1, 10), _post(2, 10), _post(3, 20))])
    assert worker.run_once(count=10) == 3
    # post 1 deleted after its fan-out; post 4 created and deleted in one batch; post 5 deleted
    # before its create arrives (another worker took the delete first)
    bus.publish_many([(settings.post_topic, e) for e in (delete(1, 10, 50), _post(4, 20), delete(4, 20, 60),
                                                          delete(5, 10, 70), delete(1, 10, 80))])
    assert worker.run_once(count=10) == 5
    bus.publish(settings.post_topic, _post(5, 10))
    assert worker.run_once(count=10) == 1
    assert worker.refresh_backlog() == 0  # every entry acknowledged
    tomb = dict(redis_client.zrange(keys.DELETED_POSTS, 0, -1, withscores=True))
    # one tombstone each, the first deletion's time kept (the redelivered delete of 1 changes nothing)
    assert tomb == {b"1": (T0 + timedelta(seconds=50)).timestamp(), b"4": (T0 + timedelta(seconds=60)).timestamp(),
                    b"5": (T0 + timedelta(seconds=70)).timestamp()}
    assert worker.stats["post_deleted"] == 4 and worker.stats["deleted"] == 2  # 4 and 5: never fanned out
    assert [m.decode() for m in redis_client.zrange(keys.user_posts(10), 0, -1)] == ["2|10"]
    assert _timeline(redis_client, 2) == ["2|10", "1|10"]  # the pushed copy of 1 waits for a read
    assert [e.post_id for e in HomeTimelineReader(redis_client).read(2, 10).entries] == [2]
    assert _timeline(redis_client, 2) == ["2|10"]  # lazy cleanup
    assert _timeline(redis_client, 1) == ["3|20", "2|10", "1|10"]  # 4 never pushed; 1 waits for a read


# ---------------------------------------------------------------- a worker SIGKILLed mid-post
def _start_worker(state_root, url: str, consumer: str, config) -> subprocess.Popen:
    env = dict(os.environ, HOME_MIXER_REDIS_URL=url, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "home_mixer.cli", "--state", str(state_root), "fanout", "run",
                             "--consumer", consumer, "--config", str(config), "--reclaim-idle-ms", "300"],
                            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.005)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_a_worker_killed_mid_post_loses_and_doubles_nothing(redis_server, redis_client, tmp_path):
    n_followers, page = 3_000, 50
    config = tmp_path / "fanout.yaml"
    # pages of 50 with a 5 ms pause: the post takes ~0.3 s, so the kill lands between its pages
    config.write_text(f"fanout:\n  page_size: {page}\n  page_pause_ms: 5\n  celebrity_threshold: 100000\n")
    store = SocialGraphStore(redis_client)
    followers = np.arange(1000, 1000 + n_followers)
    store.load_edges(followers, np.full(n_followers, 7))
    store.load_edges(followers[:10], np.full(10, 8))  # a second author, fanned out after the first
    pages_needed = sum(1 for _ in store.follower_pages(7, page))
    bus = RedisStreamsBus(redis_client)
    bus.publish_many([("posts", _post(1, 7)), ("posts", _post(2, 8))])
    progress = keys.fanout_progress(1)

    first = _start_worker(tmp_path, redis_server.url, "w1", config)
    try:
        pages_before = int(_wait(lambda: int(redis_client.hget(progress, "pages") or 0) >= 3 and
                                 redis_client.hget(progress, "pages"), 60, "the first worker's third page"))
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    assert redis_client.hget(progress, "done") is None  # killed mid-post
    have = sum(redis_client.zscore(keys.home_timeline(f), "1|7") is not None for f in followers.tolist())
    assert 0 < have < n_followers
    pending_at_kill = bus.backlog("posts", "fanout").pending
    assert pending_at_kill >= 1  # the post (and any read with it) is still pending, not acknowledged

    second = _start_worker(tmp_path, redis_server.url, "w2", config)
    try:
        # post 2 (one page) may have been written by the first worker's batch already: wait for the
        # taken-over post 1 and for nothing left pending
        _wait(lambda: redis_client.hget(progress, "done") and bus.backlog("posts", "fanout").pending == 0, 30,
              "the second worker to finish")
    finally:
        second.send_signal(signal.SIGTERM)
        out, _ = second.communicate(timeout=20)
    assert f"'retries': {pending_at_kill}" in out, out  # it took the killed worker's posts over
    # nothing lost, nothing doubled: every follower has post 1 exactly once, and only it (or 1 and 2)
    pipe = redis_client.pipeline(transaction=False)
    for f in followers.tolist():
        pipe.zrange(keys.home_timeline(f), 0, -1)
    timelines = [[m.decode() for m in t] for t in pipe.execute()]
    assert all(t.count("1|7") == 1 for t in timelines)
    assert sum(len(t) for t in timelines) == n_followers + 10
    # it resumed at the checkpoint instead of starting over: at most one page written twice
    pages_total = int(redis_client.hget(progress, "pages"))
    assert pages_total <= pages_needed + 1 < pages_needed + int(pages_before), (pages_total, pages_needed)
    backlog = bus.backlog("posts", "fanout")
    assert backlog.pending == 0 and backlog.lag == 0


# ---------------------------------------------------------------- the read path (must-have 3)
def test_the_in_network_source_merges_the_pushed_timeline_with_celebrity_pulls(redis_client):
    from mixer.candidate import Query
    from mixer.candidate_sources.in_network import InNetworkCandidateSource

    settings = FanoutSettings(celebrity_threshold=2)
    store = SocialGraphStore(redis_client)
    # user 1 follows 10 (1 follower: pushed) and celebrities 20, 21, 22 (3 followers each: pulled)
    store.load_edges(np.array([1, 1, 1, 1, 2, 3, 2, 3, 2, 3]), np.array([10, 20, 21, 22, 20, 20, 21, 21, 22, 22]))
    worker = FanoutWorker(redis_client, RedisStreamsBus(redis_client), settings)
    for post, author, t in ((1, 10, 100), (2, 20, 200), (3, 21, 300), (4, 22, 400), (5, 10, 500), (6, 20, 900)):
        worker.fan_out(_post(post, author, dt_s=t))
    assert _timeline(redis_client, 1) == ["5|10", "1|10"]  # only the normal author was pushed
    source = InNetworkCandidateSource(redis_client, max_candidates=10, posts_per_author=5, read="timeline",
                                      max_celebrity_pulls=2)
    now = (T0 + timedelta(seconds=600)).timestamp()  # post 6 is in the future of this request
    query = Query(1, 10, now, "r", engaged_authors={22: 4.0, 21: 1.0}, muted_authors=frozenset({99}))
    got = source.fetch(query)
    # pushed 5, 1 + the two strongest celebrities (22, then 21) pulled; 20 is beyond max_celebrity_pulls;
    # newest first, one list
    assert [(c.post_id, c.author_id) for c in got] == [(5, 10), (4, 22), (3, 21), (1, 10)]
    assert [c.source_score for c in got] == [1.0, 5.0, 2.0, 1.0]  # engagement weight + 1: all followed
    assert all(c.in_network and c.source == "in_network" for c in got)
    assert [c.source_detail for c in got] == ["pushed", "pulled", "pulled", "pushed"]  # the response shows it
    reader = HomeTimelineReader(redis_client)
    read = reader.read(1, 10, until=now, strength=query.engaged_authors, max_celebrity_pulls=3)
    assert read.celebrities == [22, 21, 20] and read.pulled == {2, 3, 4}
    # unfollowing a celebrity stops its pulls; blocking one hides it; a deleted pulled post is gone
    redis_client.srem(keys.graph_followees(1), 22)
    store.delete_post(3, 21)
    read = reader.read(1, 10, until=now, blocked={20}, max_celebrity_pulls=3)
    assert [e.post_id for e in read.entries] == [5, 1] and read.celebrities == [21]
    # without pulls (a user who follows no celebrity, or max_celebrity_pulls 0) only the pushed entries
    assert [e.post_id for e in reader.read(1, 10, until=now).entries] == [5, 1]


# ---------------------------------------------------------------- the demo's fan-out stage
def test_the_demo_stage_fans_out_through_worker_processes_and_reports_its_lag(redis_server, redis_client, tmp_path):
    """``home_mixer.demo_fanout.fanout_stage`` on small canonical tables: the graph's rule, two real
    worker processes, every post pushed or skipped as a celebrity's, the lag read from their
    metrics, and a showcase user whose timeline has pushed and pulled posts."""
    import pandas as pd

    from home_mixer.demo_fanout import fanout_stage, showcase_timeline

    state = StateDir(tmp_path / "state").ensure()
    ts = pd.Timestamp("2026-01-01", tz="UTC")
    # author 100 engaged by users 1..5 (a celebrity above threshold 3); author 200 by users 1, 2
    # (pushed); user 9's engagement with 300 weighs 1 (a click alone: no edge); 6 follows 200 explicitly
    rows = [(u, 100, "engagement", 2.0) for u in range(1, 6)] + [(1, 200, "engagement", 3.0),
                                                                  (2, 200, "engagement", 2.0),
                                                                  (9, 300, "engagement", 1.0), (6, 200, "follow", 1.0)]
    pd.DataFrame({"user_id": [r[0] for r in rows], "author_id": [r[1] for r in rows], "event_ts": ts,
                  "edge_type": [r[2] for r in rows], "weight": [r[3] for r in rows]}).to_parquet(
        state.table("social_edges"))
    posts = [(1, 100, 1), (2, 200, 2), (3, 200, 3), (4, 300, 4), (5, 100, 5), (6, 200, 10**6)]  # 6: after as_of
    pd.DataFrame({"post_id": [p[0] for p in posts], "author_id": [p[1] for p in posts],
                  "created_ts": [ts + pd.Timedelta(seconds=p[2]) for p in posts], "duration_ms": 1000,
                  "video_type": "NORMAL", "tags": "1", "primary_tag": 1}).to_parquet(state.table("posts"))
    as_of = ts + pd.Timedelta(hours=1)
    res = fanout_stage(state, redis_server.url, as_of, workers=2, threshold=3, post_rate=200)
    assert res.celebrities == {100}
    assert _timeline(redis_client, 1) == ["3|200", "2|200"] and _timeline(redis_client, 6) == ["3|200", "2|200"]
    assert _timeline(redis_client, 3) == [] and _timeline(redis_client, 9) == []  # celebrity only; no edge
    text = "\n".join(res.lines)
    # 2, 3 and 4 (no followers) pushed, 6 is after as_of; 2 posts x 3 followers of author 200
    assert "3 pushed, 2 celebrity posts skipped" in text and "6 home-timeline entries written" in text
    assert "fan-out lag, bus -> last follower written: p50" in text and "nan" not in text
    assert res.showcase_users == [1, 2]  # both follow the celebrity and a pushed author with posts
    user, lines = showcase_timeline(redis_server.url, res.showcase_users, as_of.timestamp())
    assert user == 1 and [ln.split()[-1] for ln in lines[2:]] == ["pulled", "pushed", "pushed", "pulled"]
    # a second run (the demo run again) clears the first and fans out again, nothing doubled
    res2 = fanout_stage(state, redis_server.url, as_of, workers=1, threshold=3, post_rate=200)
    assert "3 pushed" in "\n".join(res2.lines) and _timeline(redis_client, 1) == ["3|200", "2|200"]
