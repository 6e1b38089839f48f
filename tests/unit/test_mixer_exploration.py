"""ExplorationSelector and the propensities it logs (mixer.selectors.exploration).

The propensities are checked against the draw frequencies over many request ids: if a logged
propensity were wrong, every off-policy estimate built on the log would be biased."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pydantic
import pytest

from mixer.candidate import Candidate, Query
from mixer.components import TimelineResult
from mixer.config import ArmSettings, ExplorationSettings
from mixer.selectors import ExplorationSelector, PageCursor, PageSelector
from mixer.selectors.exploration import epsilon_greedy_slots, softmax_slots
from mixer.side_effects import ExplorationLogSideEffect, ImpressionLogSideEffect
from models.ope import softmax_policy


def _q(rid: str, page_size: int = 3, arm: str = "explore", cursor=None) -> Query:
    return Query(user_id=7, page_size=page_size, now_s=100.0, request_id=rid, arm=arm, cursor=cursor)


def _cands(scores) -> list[Candidate]:
    return [Candidate(post_id=100 + i, source="popular", score=s, light_score=0.5, heads={"click": s})
            for i, s in enumerate(scores)]


def test_softmax_first_slot_frequencies_match_the_logged_propensities():
    scores = [0.9, 0.6, 0.3, 0.1, 0.05]
    sel = ExplorationSelector({"explore": ExplorationSettings(policy="softmax", pool=5, temperature=0.2)})
    expected = softmax_policy(np.array(scores), 0.2)
    counts, logged = Counter(), {}
    n = 6000
    for r in range(n):
        out = sel.select(_q(f"req-{r}"), _cands(scores), None).candidates
        first = out[0]
        counts[first.post_id] += 1
        logged[first.post_id] = first.propensity
    for i, p in enumerate(expected):
        pid = 100 + i
        assert logged[pid] == pytest.approx(p)  # the propensity is the policy's probability ...
        assert counts[pid] / n == pytest.approx(p, abs=4 * np.sqrt(p * (1 - p) / n) + 1e-3)  # ... and the frequency


def test_second_slot_propensity_is_conditional_on_the_first():
    scores = np.array([1.0, 0.5, 0.2])
    rng = np.random.default_rng(0)
    picks, probs = softmax_slots(scores, 2, 0.5, rng)
    rest = [i for i in range(3) if i != picks[0]]
    cond = softmax_policy(scores[rest], 0.5)
    assert probs[1] == pytest.approx(cond[rest.index(picks[1])])


def test_epsilon_greedy_propensities_and_frequencies():
    n, eps, pool = 8000, 0.3, 4
    first = Counter()
    for s in range(n):
        picks, probs = epsilon_greedy_slots(2, pool, eps, np.random.default_rng(s))
        first[picks[0]] += 1
        want = (1 - eps) + eps / pool if picks[0] == 0 else eps / pool
        assert probs[0] == pytest.approx(want)
    assert first[0] / n == pytest.approx(1 - eps + eps / pool, abs=0.02)
    assert first[3] / n == pytest.approx(eps / pool, abs=0.01)


def test_the_draw_is_reproducible_per_request_and_varies_across_requests():
    sel = ExplorationSelector({"explore": ExplorationSettings(pool=6, temperature=0.5)})
    scores = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05]
    once = [c.post_id for c in sel.select(_q("same"), _cands(scores), None).candidates]
    again = [c.post_id for c in sel.select(_q("same"), _cands(scores), None).candidates]
    assert once == again
    pages = {tuple(c.post_id for c in sel.select(_q(f"r{i}"), _cands(scores), None).candidates[:3]) for i in range(50)}
    assert len(pages) > 10


def test_pool_page_and_cursor_fit_together():
    sel = ExplorationSelector({"explore": ExplorationSettings(pool=4, temperature=0.1)})
    cands = _cands([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    cursor = PageCursor(served=(100, 101), page_index=1)  # the first page served the two best
    q = _q("c", page_size=3, cursor=cursor)
    ordered = sel.select(q, cands, None).candidates
    page = PageSelector().select(q, ordered, None).candidates
    assert {c.post_id for c in page} <= {102, 103, 104, 105}  # the pool skips what earlier pages served
    assert all(0 < c.propensity <= 1 and c.pool_index >= 0 for c in page)
    assert len(ordered) == len(cands) and {c.post_id for c in ordered} == {c.post_id for c in cands}
    # a page longer than the pool: the rest is filled in ranked order, deterministically
    long_page = sel.select(_q("d", page_size=6), _cands([0.9, 0.8, 0.7, 0.6, 0.5, 0.4]), None).candidates[:6]
    assert [c.propensity for c in long_page[4:]] == [1.0, 1.0] and [c.post_id for c in long_page[4:]] == [104, 105]


def test_arms_without_exploration_are_not_touched():
    sel = ExplorationSelector({"explore": ExplorationSettings()})
    assert sel.enabled(_q("x")) and not sel.enabled(_q("x", arm="control"))


def test_exploration_settings_are_validated():
    with pytest.raises(pydantic.ValidationError):
        ExplorationSettings(temperature=0)
    with pytest.raises(pydantic.ValidationError):
        ExplorationSettings(policy="thompson")
    arm = ArmSettings(name="e", traffic_share=1.0, weights={"click": 1.0},
                      exploration={"policy": "epsilon_greedy", "epsilon": 0.2, "pool": 20})
    assert arm.exploration.epsilon == 0.2


class _Pipe:
    def __init__(self):
        self.calls = []

    def xadd(self, stream, fields, **kw):
        self.calls.append((stream, fields))


class _Client:
    """Records what the side effects would send (their Redis integration is tested with the mixer)."""

    def __init__(self):
        self.pipe = _Pipe()

    def pipeline(self, transaction=False):
        client = self

        class P:
            def __enter__(self):
                return client.pipe

            def __exit__(self, *a):
                return False

            def __getattr__(self, name):
                return getattr(client.pipe, name)

            def execute(self):
                return []
        return P()


def test_the_logs_carry_the_pool_and_each_served_posts_propensity():
    settings = ExplorationSettings(pool=5, temperature=0.3)
    sel = ExplorationSelector({"explore": settings})
    cands = _cands([0.9, 0.6, 0.3, 0.2, 0.1, 0.05])
    q = _q("log", page_size=3)
    page = PageSelector().select(q, sel.select(q, cands, None).candidates, None).candidates
    result = TimelineResult(query=q, items=page, next_cursor=None, timings_ms={}, source_results=[], filtered={},
                            counts={}, model_versions={"light_ranker": "1", "heavy_ranker": "2"}, ranked=cands)
    client = _Client()
    ExplorationLogSideEffect(client, 1000, {"explore": settings}).apply(result)
    ImpressionLogSideEffect(client, 1000).apply(result)
    (_, pool_entry), *impressions = client.pipe.calls
    pool = json.loads(pool_entry["pool"])
    assert [p[0] for p in pool] == [100, 101, 102, 103, 104]  # the pool in ranked order, not the page's
    slots = json.loads(pool_entry["slots"])
    assert [pool[i][0] for i, _ in slots] == [c.post_id for c in page]
    assert [p for _, p in slots] == [c.propensity for c in page]
    assert json.loads(pool_entry["policy"])["temperature"] == 0.3
    assert [float(f["propensity"]) for _, f in impressions] == [c.propensity for c in page]
    assert all(float(f["propensity"]) < 1 for _, f in impressions)
