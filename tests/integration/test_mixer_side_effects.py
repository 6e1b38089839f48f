"""Side effects against a real Redis: served record (TTL, cap) read back by the query hydrator,
and the capped impression stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.query_hydrators import UserContextQueryHydrator
from mixer.side_effects import ImpressionLogSideEffect, ServedPostsSideEffect

pytestmark = pytest.mark.integration


@dataclass
class Result:
    query: Query
    items: list
    model_versions: dict = field(default_factory=lambda: {"light_ranker": "3", "heavy_ranker": "5"})
    timings_ms: dict = field(default_factory=lambda: {"candidate_sources": 4.0, "heavy_ranker": 6.5})
    degraded: list = field(default_factory=list)
    scoring_paths: dict = field(default_factory=lambda: {"light_ranker": "in_process",
                                                         "heavy_ranker": "in_process"})


class Clock:
    def __init__(self, t):
        self.t = t

    def __call__(self):
        return self.t


def _result(user, post_ids):
    q = Query(user_id=user, page_size=len(post_ids), now_s=1.65e9, request_id="req", arm="control")
    return Result(q, [Candidate(p, "popular", author_id=p + 1000, score=1.0, heads={"click": 0.5}) for p in post_ids])


def test_served_posts_expire_and_are_capped(redis_client):
    clock = Clock(10_000.0)
    effect = ServedPostsSideEffect(redis_client, ttl_s=100, max_per_user=5, wall_clock=clock)
    hydrator = UserContextQueryHydrator(redis_client, served_ttl_s=100, wall_clock=clock)
    effect.apply(_result(1, [1, 2, 3]))
    clock.t += 60
    effect.apply(_result(1, [4, 5, 6]))
    q = hydrator.hydrate(Query(1, 10, 0.0, "r"))
    assert q.served_posts == {2, 3, 4, 5, 6}  # capped at the newest 5 (ties by member)
    clock.t += 50  # the first page is now 110 s old, past the 100 s TTL
    assert hydrator.hydrate(Query(1, 10, 0.0, "r")).served_posts == {4, 5, 6}
    assert 0 < redis_client.ttl(keys.served_posts(1)) <= 100


def test_impression_log_entries_and_cap(redis_client):
    effect = ImpressionLogSideEffect(redis_client, maxlen=50)
    for i in range(30):
        effect.apply(_result(7, [i * 10 + k for k in range(10)]))
    n = redis_client.xlen(keys.SERVED_IMPRESSIONS)
    assert 50 <= n < 300  # approximate trimming (MAXLEN ~) keeps about maxlen entries
    _, last = redis_client.xrevrange(keys.SERVED_IMPRESSIONS, count=1)[0]
    assert last[b"post_id"] == b"299" and last[b"position"] == b"9" and last[b"arm"] == b"control"
    assert last[b"heavy_ranker_version"] == b"5" and last[b"author_id"] == b"1299"
    # the readout's guardrail fields: the request's pipeline time so far, degraded stages, fallbacks
    assert float(last[b"pipeline_ms"]) == 10.5 and last[b"degraded"] == b"" and last[b"fallback"] == b"0"
