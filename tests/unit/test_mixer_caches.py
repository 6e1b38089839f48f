"""The mixer's shared caches (versions, bounds, last-known-good), its buffer of side-effect writes
(bound, dropped count, flush order) and the runner's handling of ``Fallback`` answers. No Redis:
a fake client stands in where one is needed."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis

from mixer.caches import MISSING, CacheSettings, MixerCaches, StoreVersions, VersionedCache
from mixer.candidate import Candidate, Query
from mixer.components import Fallback
from mixer.pipeline_runner import CandidatePipeline, PipelineRunner
from mixer.metrics import MixerMetrics
from mixer.redis_health import RedisHealth, RedisUnavailable, guarded
from mixer.side_effects.write_buffer import RedisWriteBuffer


class Counts:
    def __init__(self):
        self.seen: dict[tuple[str, str], int] = {}

    def __call__(self, cache, result, n):
        self.seen[(cache, result)] = self.seen.get((cache, result), 0) + n


def test_a_cache_serves_one_version_and_drops_it_on_change():
    counts = Counts()
    cache = VersionedCache("post_meta", 100, 10**6, on_lookup=counts)
    assert cache.set_version("v1")
    cache.put_many({1: "a", 2: "b"}, "v1")
    found, missing = cache.get_many([1, 2, 3])
    assert found == {1: "a", 2: "b"} and missing == [3]
    assert counts.seen == {("post_meta", "hit"): 2, ("post_meta", "miss"): 1}
    assert not cache.set_version("v1") and len(cache) == 2  # same version: kept
    assert cache.set_version("v2") and len(cache) == 0 and cache.get(1) is MISSING
    cache.put(1, "stale", "v1")  # read under v1, arriving after the switch: ignored
    assert cache.get(1) is MISSING
    cache.put(1, None, "v2")  # None is a value ("no such post"), not a miss
    assert cache.get(1) is None


def test_a_cache_is_bounded_by_entries_and_bytes_least_recently_used_first():
    cache = VersionedCache("c", 3, 10**6)
    cache.set_version("v")
    cache.put_many({1: "a", 2: "b", 3: "c"}, "v")
    cache.get(1)  # 1 is now the most recently used
    cache.put(4, "d", "v")
    assert set(cache.get_many([1, 2, 3, 4])[0]) == {1, 3, 4}
    rows = VersionedCache("rows", 1000, 3 * (8 * 10 + 112))
    rows.set_version("v")
    rows.put_many({i: np.zeros(10) for i in range(5)}, "v")
    assert len(rows) == 3 and rows.bytes <= rows.max_bytes
    with pytest.raises(ValueError, match="max_entries and max_bytes must be >= 1"):
        VersionedCache("bad", 0, 1)


def test_lkg_lookups_are_counted_apart_and_versions_route_to_their_caches():
    counts = Counts()
    caches = MixerCaches(CacheSettings(), on_lookup=counts)
    assert caches.apply_versions(StoreVersions(index="i1", features="f1")) == []  # first versions: nothing dropped
    caches.post_meta.put(7, (1, 2, ()), "i1")
    caches.post_features.put(7, np.ones(3), "f1")
    assert caches.warm()
    assert caches.apply_versions(StoreVersions(index="i1", features="f2")) == ["post_features"]
    assert caches.post_meta.get(7) == (1, 2, ()) and caches.post_features.get(7) is MISSING
    caches.user_context.put(5, {"follows": frozenset({1})}, "lkg")
    assert caches.user_context.get(5, lkg=True) == {"follows": frozenset({1})}
    assert counts.seen[("user_context", "lkg")] == 1 and ("user_context", "miss") not in counts.seen
    assert caches.summary()["entries"]["post_meta"] == 1


def test_health_fails_fast_while_down_and_only_connection_errors_mark_it_down():
    downs = []
    health = RedisHealth(on_down=lambda: downs.append(1))
    health.observe(redis.ResponseError("WRONGTYPE"))
    assert health.up
    with pytest.raises(redis.ConnectionError):
        guarded(health, lambda: (_ for _ in ()).throw(redis.ConnectionError("refused")))
    assert not health.up and downs == [1]
    calls = []
    with pytest.raises(RedisUnavailable):
        guarded(health, lambda: calls.append(1))
    assert calls == []  # no I/O while down
    health.mark_up()
    assert guarded(health, lambda: 42) == 42 and health.summary()["outages"] == 1


def test_the_uncached_in_network_read_fails_fast_while_redis_is_down():
    from mixer.candidate_sources import InNetworkCandidateSource

    client = FakeRedis()
    health = RedisHealth()
    source = InNetworkCandidateSource(client, health=health)
    query = Query(user_id=1, page_size=10, now_s=100.0, request_id="r", follows=frozenset({3}))
    client.down = True
    with pytest.raises(redis.ConnectionError):  # the first read finds Redis down and says so
        source.fetch(query)
    assert not health.up
    client.pipeline = lambda transaction=False: pytest.fail("no Redis I/O while it is marked down")
    with pytest.raises(RedisUnavailable):
        source.fetch(query)


class FakePipeline:
    def __init__(self, client):
        self.client, self.ops = client, []

    @property
    def command_stack(self):
        return self.ops

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.ops.append((name, args))

    def execute(self, raise_on_error=True):
        if self.client.down:
            raise redis.ConnectionError("Connection refused")
        self.client.written.extend(self.ops)
        return [1] * len(self.ops)


class FakeRedis:
    def __init__(self):
        self.down = False
        self.written: list = []

    def pipeline(self, transaction=False):
        return FakePipeline(self)


def _write(n):
    return lambda pipe: pipe.xadd("stream", {"n": n})


def test_writes_are_buffered_while_redis_is_down_and_flushed_in_order_past_drops():
    client, health = FakeRedis(), RedisHealth()
    dropped, flushed = [], []
    buf = RedisWriteBuffer(client, health, max_writes=3, flush_batch=2,
                           on_drop=lambda name, n: dropped.append((name, n)),
                           on_flush=lambda name, n: flushed.append((name, n)))
    assert buf.write("impression_log", _write(0)) == "written"
    client.down = True
    assert buf.write("impression_log", _write(1)) == "buffered" and not health.up
    for n in range(2, 6):
        assert buf.write("served_posts" if n % 2 else "impression_log", _write(n)) == "buffered"
    # bound 3: writes 1 and 2 were dropped (oldest first) and counted
    assert len(buf) == 3 and buf.dropped == {"impression_log": 2}
    assert dropped == [("impression_log", 1), ("impression_log", 1)]
    assert buf.flush() == 0 and len(buf) == 3  # still down: kept
    client.down = False
    health.mark_up()
    assert buf.write("impression_log", _write(6)) == "queued"  # behind the waiting ones: order kept
    assert buf.dropped == {"impression_log": 2, "served_posts": 1}  # the bound holds for queued writes too
    assert buf.flush() == 3 and not buf.pending()
    assert [args[1]["n"] for _, args in client.written] == [0, 4, 5, 6]
    assert buf.stats()["flushed"] == {"served_posts": 1, "impression_log": 2}
    assert sum(n for _, n in flushed) == 3
    assert buf.write("impression_log", _write(7)) == "written"


def test_the_runner_goes_on_with_fallback_values_and_reports_their_stages():
    class LkgContext:
        name = "user_context"

        def enabled(self, query):
            return True

        def hydrate(self, query):
            raise Fallback(query, "Redis unavailable: cold-start context")

    class CachedSource:
        name, timeout_ms = "popular", 1000

        def enabled(self, query):
            return True

        def fetch(self, query):
            raise Fallback([Candidate(post_id=p, source="popular") for p in (1, 2, 3)], "cached list")

    class CachedMeta:
        name = "post_metadata"

        def enabled(self, query):
            return True

        def hydrate(self, query, candidates):
            for c in candidates[:2]:
                c.author_id, c.created_ts = c.post_id + 10, 1.0
            raise Fallback((candidates[:2], 1), "1 without cached metadata")

    class BufferedWrite:
        name, after_total = "served_posts", False

        def enabled(self, query):
            return True

        def apply(self, result):
            raise Fallback(None, "buffered")

    metrics = MixerMetrics()
    with ThreadPoolExecutor(2) as pool:
        runner = PipelineRunner(CandidatePipeline(query_hydrators=[LkgContext()], candidate_sources=[CachedSource()],
                                                  candidate_hydrators=[CachedMeta()], side_effects=[BufferedWrite()]),
                                executor=pool, metrics=metrics)
        res = runner.run(Query(user_id=1, page_size=5, now_s=2.0, request_id="r"))
    assert res.degraded == ["query_hydration", "candidate_sources", "candidate_hydration", "side_effects"]
    assert res.counts["retrieved"] == 3 and res.counts["hydrated"] == 2
    assert res.source_results[0].status == "fallback" and len(res.source_results[0].candidates) == 3
    assert metrics.registry.get_sample_value("hm_mixer_side_effect_failures_total",
                                             {"side_effect": "served_posts"}) is None  # not a failure


@pytest.mark.parametrize("connection, expected", [
    ("127.0.0.1:6380", {"host": "127.0.0.1", "port": 6380, "db": 0}),
    ("cache.local:6390,db=3,password=s3cret", {"host": "cache.local", "port": 6390, "db": 3, "password": "s3cret"}),
])
def test_materialize_bumps_the_feature_version_on_feasts_redis(connection, expected):
    """``feature_repo.store.materialize`` writes ``FEATURE_VERSION`` through a client built from
    Feast's connection string (the inverse of ``core.services.feast_connection_string``)."""
    from feature_repo.store import _online_client

    kwargs = _online_client(connection).connection_pool.connection_kwargs
    assert {k: kwargs.get(k) for k in expected} == expected
