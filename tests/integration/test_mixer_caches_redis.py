"""The cached components against a real Redis: the same answers as uncached ones, a new version
picked up, and last-known-good answers (``Fallback``) from a client whose Redis is gone."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import redis
from feast.protos.feast.types.Value_pb2 import Value

from core import online_layout as keys
from core.online_layout import FeastRedisLayout
from core.services import free_port
from mixer.caches import CacheSettings, MixerCaches, StoreVersions
from mixer.candidate import Candidate, Query
from mixer.candidate_hydrators import PostMetadataCandidateHydrator
from mixer.candidate_sources import InNetworkCandidateSource, PopularCandidateSource, TagInterestCandidateSource
from mixer.components import Fallback
from mixer.feature_hydrators import FeastLayoutFeatureHydrator
from mixer.query_hydrators import UserContextQueryHydrator
from mixer.redis_health import RedisHealth, read_versions

pytestmark = pytest.mark.integration

AS_OF = 1_650_000_000.0
POSTS = list(range(100, 110))


def _value(x: float) -> bytes:
    return Value(double_val=x).SerializeToString()


def _fill(client: redis.Redis, layout: FeastRedisLayout, bump: float = 0.0) -> None:
    client.hset(keys.INDEX_META, mapping={"as_of": AS_OF, "built_at": "b1"})
    for p in POSTS:
        client.hset(keys.POST_META, p, keys.encode_post_meta(p % 3, int(AS_OF) - p, [p % 2]))
        client.zadd(keys.author_posts(p % 3), {p: AS_OF - p})
        client.zadd(keys.tag_posts(p % 2), {p: float(p)})
        client.zadd(keys.popular("7d"), {p: float(p)})
        v = layout.views["content_features"]
        client.hset(layout.key(v.name, post_id=p),
                    mapping={f: _value(p + j + bump) for j, f in enumerate(layout.fields[v.name])})
    v = layout.views["user_features"]
    client.hset(layout.key(v.name, user_id=1), mapping={f: _value(7.0) for f in layout.fields[v.name]})
    client.zadd(keys.engaged_authors(1), {0: 3.0, 1: 2.0, 2: 1.0})
    client.zadd(keys.tag_interest(1), {0: 1.0, 1: 0.5})


def _dead_client() -> redis.Redis:
    return redis.Redis(port=free_port(), socket_connect_timeout=0.2, socket_timeout=0.2)


def test_cached_components_answer_like_uncached_ones_then_fall_back_to_what_they_hold(redis_client):
    layout = FeastRedisLayout("home_mixer", 3)
    _fill(redis_client, layout)
    caches = MixerCaches(CacheSettings())
    caches.apply_versions(read_versions(redis_client))
    assert caches.versions.index_as_of == AS_OF and caches.versions.features is None
    health = RedisHealth()
    query = Query(user_id=1, page_size=5, now_s=AS_OF + 10, request_id="r")

    def components(client, cached):
        c = caches if cached else None
        return (UserContextQueryHydrator(client, 3600, caches=c, health=health if cached else None),
                [InNetworkCandidateSource(client, caches=c, health=health if cached else None),
                 TagInterestCandidateSource(client, caches=c, health=health if cached else None),
                 PopularCandidateSource(client, caches=c, health=health if cached else None)],
                PostMetadataCandidateHydrator(client, caches=c, health=health if cached else None),
                FeastLayoutFeatureHydrator(client, layout, caches=c, health=health if cached else None))

    def run(client, cached):
        ctx, sources, meta, features = components(client, cached)
        q = ctx.hydrate(query)
        cands = [c for s in sources for c in s.fetch(q)]
        cands, _ = meta.hydrate(q, cands)
        return q, cands, features.hydrate(q, cands, None)

    plain = run(redis_client, False)
    for _ in range(2):  # a miss that fills, then a hit: both equal the uncached answer
        cached = run(redis_client, True)
        assert [(c.post_id, c.source, c.author_id, c.created_ts) for c in cached[1]] == \
               [(c.post_id, c.source, c.author_id, c.created_ts) for c in plain[1]]
        pd.testing.assert_frame_equal(cached[2], plain[2])
    assert len(caches.post_features) == len(POSTS) and len(caches.post_meta) == len(POSTS)

    # new feature values: served only once the version says so
    _fill(redis_client, layout, bump=1000.0)
    col = list(layout.views["content_features"].features)[0]
    assert run(redis_client, True)[2][col].max() < 1000
    redis_client.set(keys.FEATURE_VERSION, "2")
    caches.apply_versions(read_versions(redis_client))
    assert run(redis_client, True)[2][col].min() >= 1000

    # Redis gone: every cached component answers with what it holds, as a Fallback
    ctx, sources, meta, features = components(_dead_client(), True)
    with pytest.raises(Fallback) as f:
        ctx.hydrate(query)
    q = f.value.value
    assert q.engaged_authors == {0: 3.0, 1: 2.0, 2: 1.0}  # the last-known context
    assert not health.up
    got = []
    for s in sources:  # everything they need is cached: a normal answer, no Redis call
        got += s.fetch(q)
    assert {c.post_id for c in got} == set(POSTS)
    with pytest.raises(Fallback) as f:  # one tag never read: the cached tags answer, degraded
        sources[1].fetch(Query(user_id=1, page_size=5, now_s=AS_OF, request_id="r", tag_interests={0: 1.0, 9: 2.0}))
    assert {c.post_id for c in f.value.value} == {p for p in POSTS if p % 2 == 0}
    with pytest.raises(Fallback) as f:
        meta.hydrate(q, got + [Candidate(post_id=999, source="popular")])
    kept, dropped = f.value.value
    assert len(kept) == len(got) and dropped == 1  # an uncached post cannot be hydrated
    with pytest.raises(Fallback) as f:
        features.hydrate(q, kept, None)
    frame = f.value.value
    assert frame[col].min() >= 1000  # post features from the cache
    user_col = list(layout.views["user_features"].features)[0]
    assert frame[user_col].isna().all()  # user features are per request: missing
    with pytest.raises(redis.ConnectionError):  # a user never served: blocks unknown, no unsafe page
        ctx.hydrate(Query(user_id=2, page_size=5, now_s=AS_OF, request_id="r"))
    assert np.isfinite(frame[col]).all()


def test_versions_read_from_redis(redis_client):
    assert read_versions(redis_client) == StoreVersions()
    redis_client.hset(keys.INDEX_META, mapping={"as_of": "2022-05-04T16:00:00+00:00", "built_at": "x"})
    redis_client.set(keys.FEATURE_VERSION, "12.5")
    v = read_versions(redis_client)
    assert v.index == "2022-05-04T16:00:00+00:00|x" and v.features == "12.5"
    assert v.index_as_of == pd.Timestamp("2022-05-04T16:00:00Z").timestamp()


def test_a_write_redis_refuses_is_dropped_and_counted_not_replayed(redis_client):
    """A command error mid-batch (here WRONGTYPE) must not make the flush write the rest again."""
    from mixer.side_effects.write_buffer import RedisWriteBuffer

    client = redis_client
    client.set("not_a_zset", "x")
    health = RedisHealth()
    health.observe(redis.ConnectionError("down"))  # Redis "down": writes queue in the buffer
    buf = RedisWriteBuffer(client, health, max_writes=100, flush_batch=10)
    buf.write("impression_log", lambda pipe: pipe.xadd("imp", {"n": 1}))
    buf.write("served_posts", lambda pipe: pipe.zadd("not_a_zset", {"p": 1.0}))
    buf.write("impression_log", lambda pipe: pipe.xadd("imp", {"n": 2}))
    health.mark_up()
    assert buf.flush() == 3
    assert buf.flush() == 0 and not buf.pending()  # nothing left to replay
    assert [e[1][b"n"] for e in client.xrange("imp")] == [b"1", b"2"]  # each written once
    assert buf.stats()["dropped"] == {"served_posts": 1}
