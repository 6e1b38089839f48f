"""The generic pipeline runner on in-memory components: stage order and timings, enabled gates,
fail-open feature hydration and side effects, one-line filters; and the home-timeline declaration's
config gates."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import redis

from core.schema import ALL_FEATURES, HEADS
from mixer.candidate import Candidate, Query
from mixer.components import (
    CandidateHydrator,
    CandidateSource,
    FeatureHydrator,
    Filter,
    FilterResult,
    QueryHydrator,
    Scorer,
    Selector,
    SelectorResult,
    SideEffect,
)
from mixer.config import load_config, parse_config
from mixer.filters import DuplicateFilter, PreviouslySeenFilter
from mixer.metrics import MixerMetrics
from mixer.pipeline import RankerSet, home_timeline
from mixer.pipeline_runner import FIXED_STAGES, CandidatePipeline, PipelineRunner, ScoringStage
from mixer.scorers import HeavyRankerScorer, LightRankerScorer
from mixer.selectors import (AuthorDiversitySelector, ExplorationSelector, InterleavingSelector, PageSelector,
                             TopKSelector)
from mixer.side_effects import RequestMetricsSideEffect

ALL_STAGES = ["query_hydration", "candidate_sources", "candidate_hydration", "filters", "feature_hydration",
              "realtime_features", "light_ranker", "heavy_ranker", "blender", "selectors", "side_effects", "total"]


class Calls:
    """Counts calls per component name (shared by the fakes of one test)."""

    def __init__(self):
        self.n: dict[str, int] = {}

    def hit(self, name):
        self.n[name] = self.n.get(name, 0) + 1


class Gate:
    """Mixin: ``enabled`` from the constructor (the component's own config)."""

    def __init__(self, calls, on=True, name=None):
        self.calls, self.on = calls, on
        self.name = name or self.name

    def enabled(self, query):
        return self.on


class Context(Gate, QueryHydrator):
    name = "context"

    def hydrate(self, query):
        self.calls.hit(self.name)
        return dataclasses.replace(query, seen_posts=frozenset({0}), arm="control")


class Posts(Gate, CandidateSource):
    """Posts 0..19 by author post_id % 5."""

    name, timeout_ms = "posts", 1000

    def fetch(self, query):
        self.calls.hit(self.name)
        return [Candidate(post_id=i, source=self.name, source_score=float(i)) for i in range(20)]


class Meta(Gate, CandidateHydrator):
    name = "meta"

    def hydrate(self, query, candidates):
        self.calls.hit(self.name)
        for c in candidates:
            c.author_id, c.created_ts = c.post_id % 5, query.now_s - 60.0
        return candidates, 0


class Batch(Gate, FeatureHydrator):
    """Builds the frame: user_click_rate = post_id / 100 (or raises)."""

    name, stage = "batch", "feature_hydration"

    def __init__(self, calls, on=True, fail=False):
        super().__init__(calls, on)
        self.fail, self.made = fail, None

    def hydrate(self, query, candidates, features=None):
        self.calls.hit(self.name)
        if self.fail:
            raise ConnectionError("online store down")
        self.made = pd.DataFrame(np.nan, index=range(len(candidates)), columns=list(ALL_FEATURES))
        self.made["user_click_rate"] = [c.post_id / 100 for c in candidates]
        return self.made


class Fresh(Gate, FeatureHydrator):
    """Refines the frame in place (or raises); remembers what it was given."""

    name, stage = "fresh", "realtime_features"

    def __init__(self, calls, on=True, fail=False):
        super().__init__(calls, on)
        self.fail, self.given = fail, None

    def hydrate(self, query, candidates, features):
        self.calls.hit(self.name)
        self.given = features
        if self.fail:
            raise TimeoutError("stream stale")
        features["post_clicks_1h"] = 1.0
        return features


class ByFeature(Gate, Scorer):
    """light_score = score = user_click_rate (NaN -> -post_id / 1000); reports a path."""

    name, version = "light_ranker", "7"

    def score(self, query, candidates, features):
        self.calls.hit(self.name)
        self.seen = features
        x = features["user_click_rate"].to_numpy()
        for c, v in zip(candidates, x):
            c.light_score = c.score = v if np.isfinite(v) else -c.post_id / 1000
        return "in_process"


class Boost(Gate, Scorer):
    """score += 1 for even posts; no model, no path."""

    name, version = "boost", ""

    def score(self, query, candidates, features):
        self.calls.hit(self.name)
        for c in candidates:
            c.score += 1.0 if c.post_id % 2 == 0 else 0.0
        return None


class Best(Gate, Selector):
    """Keeps the k best by score with their feature rows."""

    name = "best"

    def __init__(self, calls, k, on=True, keep_rows=True):
        super().__init__(calls, on)
        self.k, self.keep_rows = k, keep_rows

    def select(self, query, candidates, features):
        self.calls.hit(self.name)
        order = sorted(range(len(candidates)), key=lambda i: -candidates[i].score)[: self.k]
        rows = features.iloc[order].reset_index(drop=True) if self.keep_rows else None
        return SelectorResult([candidates[i] for i in order], rows)


class Record(Gate, SideEffect):
    name = "record"

    def apply(self, result):
        self.calls.hit(self.name)
        self.timings = dict(result.timings_ms)


class Boom(Gate, SideEffect):
    name = "boom"

    def apply(self, result):
        self.calls.hit(self.name)
        raise RuntimeError("stream full")


class OddPostFilter(Filter):
    """A new filter: the whole class a new filter needs."""

    name = "odd_post"

    def apply(self, query, candidates):
        return FilterResult([c for c in candidates if c.post_id % 2 == 0], [c for c in candidates if c.post_id % 2])


class Increments:
    """Increments of watched metric samples since construction.

    Once ``import feast`` has switched prometheus_client to multi-process mode (any earlier test
    may have), a sample's value is shared by every registry of the process, so tests compare
    increments; a labelled child is created before reading, since a registry only reports the
    children it has.

    Args:
        metrics: the MixerMetrics under test.
        watched: (MixerMetrics attribute, sample name, labels) of each sample to read later.
    """

    def __init__(self, metrics, *watched):
        self.metrics = metrics
        self.base = {(sample, frozenset(labels.items())): self._read(attr, sample, labels)
                     for attr, sample, labels in watched}
        self.attrs = {(sample, frozenset(labels.items())): attr for attr, sample, labels in watched}

    def _read(self, attr, sample, labels):
        if labels:
            getattr(self.metrics, attr).labels(**labels)
        return self.metrics.registry.get_sample_value(sample, labels) or 0.0

    def __call__(self, sample, labels=None):
        key = (sample, frozenset((labels or {}).items()))
        return self._read(self.attrs[key], sample, labels or {}) - self.base[key]


def _query(page_size=4):
    return Query(user_id=9, page_size=page_size, now_s=1_000_000.0, request_id="r")


def _declare(calls, metrics, *, filters=None, batch_hydrator=None, fresh_hydrator=None, side_effects=None,
             **off):
    """A small pipeline of every kind; ``off={"name": True}`` disables that component."""

    def on(name):
        return not off.get(name, False)

    return CandidatePipeline(
        query_hydrators=[Context(calls, on("context"))],
        candidate_sources=[Posts(calls, on("posts")), Posts(calls, on("more_posts"), name="more_posts")],
        candidate_hydrators=[Meta(calls, on("meta"))],
        filters=filters if filters is not None else [PreviouslySeenFilter(), DuplicateFilter()],
        feature_hydrators=[batch_hydrator or Batch(calls, on("batch")), fresh_hydrator or Fresh(calls, on("fresh"))],
        scoring=[
            ScoringStage("light_ranker", scorers=[ByFeature(calls, on("light_ranker"))]),
            ScoringStage("heavy_ranker", selectors=[Best(calls, 6, on("best"))]),
            ScoringStage("blender", scorers=[Boost(calls, on("boost"))]),
        ],
        selectors=[AuthorDiversitySelector(2), PageSelector()],
        side_effects=side_effects if side_effects is not None else [
            Record(calls, on("record")), RequestMetricsSideEffect(metrics)],
    )


@pytest.fixture()
def pool():
    ex = ThreadPoolExecutor(2)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


def _run(pool, pipeline, metrics, query=None):
    return PipelineRunner(pipeline, executor=pool, metrics=metrics).run(query or _query())


def test_timings_contain_every_stage_in_order_and_metrics_see_total(pool):
    calls, metrics = Calls(), MixerMetrics()
    pipeline = _declare(calls, metrics)
    inc = Increments(metrics, ("request_seconds", "hm_mixer_request_seconds_count", {}),
                     ("request_seconds", "hm_mixer_request_seconds_sum", {}),
                     *[("stage_seconds", "hm_mixer_stage_seconds_count", {"stage": s}) for s in ALL_STAGES[:-1]],
                     ("scoring", "hm_mixer_scoring_total", {"model": "light_ranker", "path": "in_process"}),
                     ("requests", "hm_mixer_requests_total", {"status": "ok"}))
    res = _run(pool, pipeline, metrics)
    assert list(res.timings_ms) == ALL_STAGES
    assert all(v >= 0 for v in res.timings_ms.values())
    assert res.timings_ms["total"] >= sum(v for k, v in res.timings_ms.items() if k != "total") * 0.99
    # post 0 seen; duplicates of the second source removed; best 6 by user_click_rate = 19..14,
    # the blender's +1 for even posts puts 18, 16, 14 first, author diversity discounts 19 (author
    # 4, like 14) below 17 and 15; the page is 4
    assert res.filtered == {"previously_seen": 2, "duplicate": 19}
    assert [c.post_id for c in res.items] == [18, 16, 14, 17]
    assert res.counts == {"retrieved": 40, "hydrated": 40, "after_filters": 19, "heavy_ranked": 6, "selected": 4}
    assert res.next_cursor is not None and res.next_cursor.served == (18, 16, 14, 17)
    assert res.model_versions == {"light_ranker": "7"} and res.scoring_paths == {"light_ranker": "in_process"}
    assert [r.name for r in res.source_results] == ["posts", "more_posts"] and res.degraded == []
    # the timed side effect ran before "side_effects"/"total"; the metrics side effect after them
    record = pipeline.side_effects[0]
    assert "side_effects" not in record.timings and "total" not in record.timings
    assert inc("hm_mixer_request_seconds_count") == 1
    assert inc("hm_mixer_request_seconds_sum") == pytest.approx(res.timings_ms["total"] / 1000)
    for stage in ALL_STAGES[:-1]:
        assert inc("hm_mixer_stage_seconds_count", {"stage": stage}) == 1, stage
    assert inc("hm_mixer_scoring_total", {"model": "light_ranker", "path": "in_process"}) == 1
    assert inc("hm_mixer_requests_total", {"status": "ok"}) == 1


def test_the_feature_frame_is_passed_on_without_copies(pool):
    calls, metrics = Calls(), MixerMetrics()
    batch, fresh = Batch(calls), Fresh(calls)
    pipeline = _declare(calls, metrics, batch_hydrator=batch, fresh_hydrator=fresh)
    _run(pool, pipeline, metrics)
    light = pipeline.scoring[0].scorers[0]
    assert fresh.given is batch.made and light.seen is batch.made


def test_a_failing_feature_hydrator_fails_open_with_degraded(pool):
    calls, metrics = Calls(), MixerMetrics()
    fresh = Fresh(calls)
    pipeline = _declare(calls, metrics, batch_hydrator=Batch(calls, fail=True), fresh_hydrator=fresh)
    inc = Increments(metrics, ("requests", "hm_mixer_requests_total", {"status": "degraded"}))
    res = _run(pool, pipeline, metrics)
    assert res.degraded == ["feature_hydration"] and len(res.items) == 4
    # the next hydrator got the all-NaN frame of the candidates, and still ran
    assert fresh.given.shape == (19, len(ALL_FEATURES)) and list(fresh.given.columns) == list(ALL_FEATURES)
    assert fresh.given["user_click_rate"].isna().all() and (fresh.given["post_clicks_1h"] == 1.0).all()
    assert "feature_hydration" in res.timings_ms and "realtime_features" in res.timings_ms
    assert inc("hm_mixer_requests_total", {"status": "degraded"}) == 1

    # a failing refiner keeps the frame of the hydrator before it (the same object: no copy)
    calls, metrics = Calls(), MixerMetrics()
    batch = Batch(calls)
    pipeline = _declare(calls, metrics, batch_hydrator=batch, fresh_hydrator=Fresh(calls, fail=True))
    res = _run(pool, pipeline, metrics)
    assert res.degraded == ["realtime_features"] and pipeline.scoring[0].scorers[0].seen is batch.made
    assert [c.post_id for c in res.items] == [18, 16, 14, 17]  # the batch ranking


def test_disabled_components_do_not_run(pool):
    calls, metrics = Calls(), MixerMetrics()
    names = ["context", "more_posts", "meta", "fresh", "best", "boost", "record"]
    pipeline = _declare(calls, metrics, **{n: True for n in names})
    res = _run(pool, pipeline, metrics, _query(page_size=3))
    assert not set(calls.n) & set(names), calls.n
    assert calls.n == {"posts": 1, "batch": 1, "light_ranker": 1}
    assert [r.name for r in res.source_results] == ["posts"]  # no result for the disabled source
    # no context: post 0 is not seen and no arm; no meta: authors unset; no top K: all 20 go on
    assert res.filtered == {"previously_seen": 0, "duplicate": 0} and res.counts["heavy_ranked"] == 20
    assert res.query.arm is None
    # stages named by their components are timed only when one of them ran
    assert "realtime_features" not in res.timings_ms
    assert "heavy_ranker" not in res.timings_ms and "blender" not in res.timings_ms
    assert {"query_hydration", "candidate_hydration", "selectors", "side_effects", "total"} <= set(res.timings_ms)
    # a disabled filter is not counted
    calls = Calls()

    class OffFilter(OddPostFilter):
        def enabled(self, query):
            return False

    res = _run(pool, _declare(calls, metrics, filters=[OffFilter(), DuplicateFilter()]), metrics)
    assert res.filtered == {"duplicate": 20}


def test_a_filter_added_by_one_line_is_applied_and_counted(pool):
    calls, metrics = Calls(), MixerMetrics()
    filters = [
        PreviouslySeenFilter(),
        DuplicateFilter(),
        OddPostFilter(),  # the one line
    ]
    inc = Increments(metrics, ("filtered", "hm_mixer_filtered_total", {"filter": "odd_post"}))
    res = _run(pool, _declare(calls, metrics, filters=filters), metrics)
    assert res.filtered == {"previously_seen": 2, "duplicate": 19, "odd_post": 10}
    assert res.counts["after_filters"] == 9 and all(c.post_id % 2 == 0 for c in res.items)
    assert inc("hm_mixer_filtered_total", {"filter": "odd_post"}) == 10


def test_a_raising_side_effect_is_counted_and_the_request_is_served(pool):
    calls, metrics = Calls(), MixerMetrics()
    pipeline = _declare(calls, metrics, side_effects=[Boom(calls), Record(calls), RequestMetricsSideEffect(metrics)])
    inc = Increments(metrics, *[("side_effect_failures", "hm_mixer_side_effect_failures_total", {"side_effect": n})
                                for n in ("boom", "record", "late_boom")],
                     ("requests", "hm_mixer_requests_total", {"status": "ok"}))
    res = _run(pool, pipeline, metrics)
    assert len(res.items) == 4 and calls.n["boom"] == 1 and calls.n["record"] == 1  # the next one still ran
    assert inc("hm_mixer_side_effect_failures_total", {"side_effect": "boom"}) == 1
    assert inc("hm_mixer_side_effect_failures_total", {"side_effect": "record"}) == 0
    assert inc("hm_mixer_requests_total", {"status": "ok"}) == 1  # not a degraded page

    class LateBoom(Boom):
        name, after_total = "late_boom", True

    res = _run(pool, _declare(calls, metrics, side_effects=[LateBoom(calls)]), metrics)
    assert len(res.items) == 4
    assert inc("hm_mixer_side_effect_failures_total", {"side_effect": "late_boom"}) == 1


def test_declarations_are_checked(pool):
    calls, metrics = Calls(), MixerMetrics()
    with pytest.raises(ValueError, match="filter names must be unique"):
        _declare(calls, metrics, filters=[DuplicateFilter(), DuplicateFilter()])

    class NoGate:
        name = "no_gate"

        def apply(self, query, candidates):
            return FilterResult(candidates)

    with pytest.raises(TypeError, match="no_gate.*enabled"):
        _declare(calls, metrics, filters=[NoGate()])
    with pytest.raises(ValueError, match="used twice"):
        CandidatePipeline(scoring=[ScoringStage("filters")])
    with pytest.raises(ValueError, match="used twice"):
        CandidatePipeline(scoring=[ScoringStage("a"), ScoringStage("a")])
    assert set(FIXED_STAGES) < set(ALL_STAGES)
    # a selector inside a scoring stage must carry the feature rows its scorers read
    bad = dataclasses.replace(_declare(calls, metrics), scoring=[
        ScoringStage("heavy_ranker", selectors=[Best(calls, 3, keep_rows=False)], scorers=[Boost(calls)])])
    with pytest.raises(TypeError, match="no feature rows"):
        _run(pool, bad, metrics)


def test_home_timeline_declaration_reads_top_to_bottom_and_gates_from_config():
    from dataclasses import dataclass

    @dataclass
    class Handle:
        feature_names: tuple
        heads: tuple
        version: int = 3

        def predict(self, frame):  # pragma: no cover - not called
            raise AssertionError

    class Store(FeatureHydrator):
        name = "store"

        def hydrate(self, query, candidates, features=None):  # pragma: no cover - not called
            raise AssertionError

    rankers = RankerSet(LightRankerScorer(Handle(("user_click_rate",), ("click",))),
                        HeavyRankerScorer(Handle(("user_click_rate",), HEADS, 4)))
    client = redis.Redis(host="127.0.0.1", port=1)  # never connected: declaring does no I/O
    cfg = load_config()
    p = home_timeline(cfg, rankers, client=client, feature_hydrator=Store(), metrics=MixerMetrics())
    assert [s.name for s in p.candidate_sources] == ["coengagement", "embedding", "in_network", "tag_interest",
                                                     "trending", "popular"]
    assert [h.name for h in p.query_hydrators] == ["user_context", "action_sequence", "user_embedding",
                                                  "experiment_arm"]
    assert [f.name for f in p.filters] == ["previously_seen", "hated_author", "blocked_muted_author", "max_age",
                                           "duplicate"]
    assert [(h.name, h.stage) for h in p.feature_hydrators] == [("store", "feature_hydration"),
                                                               ("history", "history_features"),
                                                               ("retrieval", "retrieval_features"),
                                                               ("realtime", "realtime_features")]
    assert [(s.name, [x.name for x in s.selectors], [x.name for x in s.scorers]) for s in p.scoring] == [
        ("light_ranker", [], ["light_ranker"]), ("heavy_ranker", ["top_k"], ["heavy_ranker"]),
        ("blender", [], ["weighted_sum"])]
    assert isinstance(p.scoring[1].selectors[0], TopKSelector)
    assert [type(s) for s in p.selectors] == [AuthorDiversitySelector, ExplorationSelector, InterleavingSelector,
                                             PageSelector]
    assert not p.selectors[1].enabled(dataclasses.replace(_query(), arm="control"))  # the embedded arms do not explore
    assert [(e.name, e.after_total) for e in p.side_effects] == [
        ("served_posts", False), ("impression_log", False), ("exploration_log", False), ("feature_log", False),
        ("drift_sample", False), ("shadow_scoring", False), ("request_metrics", True)]
    assert p.model_versions == {"light_ranker": "3", "heavy_ranker": "4"}
    q = _query()
    assert not p.side_effects[5].enabled(q)  # no experiment.shadow: nothing is shadow-scored
    assert not p.candidate_sources[1].enabled(q)  # no two-tower model registered: learned retrieval off

    @dataclass
    class TwoTower:
        version: int = 5
        item_ids: tuple = (1, 2)

    with_retrieval = home_timeline(cfg, RankerSet(rankers.light, rankers.heavy, TwoTower()), client=client,
                                   feature_hydrator=Store(), metrics=MixerMetrics())
    assert with_retrieval.candidate_sources[1].enabled(q) and with_retrieval.feature_hydrators[2].enabled(q)
    assert not p.feature_hydrators[2].enabled(q)
    assert with_retrieval.model_versions == {"light_ranker": "3", "heavy_ranker": "4", "two_tower": "5"}
    assert p.candidate_sources[4].enabled(q) and p.feature_hydrators[3].enabled(q)
    assert p.feature_hydrators[1].enabled(q)
    assert p.candidate_sources[0].enabled(q) and p.query_hydrators[1].enabled(q)

    data = cfg.model_dump()
    data["candidate_sources"]["trending"]["enabled"] = False
    data["candidate_sources"]["coengagement"]["enabled"] = False
    data["action_sequence"]["enabled"] = False
    data["realtime"]["enabled"] = False
    off = home_timeline(parse_config(data), rankers, client=client, feature_hydrator=Store(), metrics=MixerMetrics())
    assert not off.candidate_sources[4].enabled(q) and not off.feature_hydrators[3].enabled(q)
    assert not off.feature_hydrators[1].enabled(q)  # no action sequence: no history features
    assert not off.candidate_sources[0].enabled(q) and not off.query_hydrators[1].enabled(q)
    assert all(s.enabled(q) for s in off.candidate_sources if s.name not in ("trending", "coengagement", "embedding"))
    # without the action sequence learned retrieval has nothing to embed: off even with a model
    off_tt = home_timeline(parse_config(data), RankerSet(rankers.light, rankers.heavy, TwoTower()), client=client,
                           feature_hydrator=Store(), metrics=MixerMetrics())
    assert not off_tt.candidate_sources[1].enabled(q) and not off_tt.feature_hydrators[2].enabled(q)
