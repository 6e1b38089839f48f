"""The pipeline's control flow with in-memory components: stage order, fail-open paths, paging."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from core.id_features import id_bucket_columns
from core.schema import ALL_FEATURES, HEADS, ID_FEATURES
from mixer.blenders import WeightedSumBlender
from mixer.candidate import Candidate
from mixer.components import CandidateHydrator, CandidateSource, FeatureHydrator, QueryHydrator, SideEffect
from mixer.config import load_config
from mixer.filters import DuplicateFilter, HatedAuthorFilter, MaxAgeFilter, PreviouslySeenFilter
from mixer.metrics import MixerMetrics
from mixer.pipeline import HomeTimelinePipeline, RankerSet
from mixer.pipeline_runner import CandidatePipeline, ScoringStage
from mixer.query_hydrators import ExperimentArmQueryHydrator
from mixer.scorers import HeavyRankerScorer, LightRankerScorer
from mixer.selectors import AuthorDiversitySelector, PageSelector, TopKSelector
from mixer.side_effects import RequestMetricsSideEffect

CONFIG = load_config()
NOW = CONFIG.clock.now_s()


@dataclass
class Handle:
    feature_names: tuple
    heads: tuple
    version: int = 1

    def predict(self, frame):
        x = np.nan_to_num(frame[self.feature_names[0]].to_numpy(), nan=0.5)
        return np.stack([x] * len(self.heads), axis=1).astype(np.float32)


class ListSource(CandidateSource):
    name, timeout_ms = "popular", 500

    def fetch(self, query):
        # 60 posts, 3 per author, created 1 day ago; post 0 is hated by author, 1 is seen
        return [Candidate(post_id=i, source=self.name, source_score=float(i)) for i in range(60)]


class MetaHydrator(CandidateHydrator):
    name = "post_metadata"

    def hydrate(self, query, candidates):
        for c in candidates:
            c.author_id, c.created_ts = c.post_id // 3, NOW - 86400.0
        return candidates, 0


class ScoreByIdFeatures(FeatureHydrator):
    """user_click_rate = post_id / 100 so higher ids rank higher."""

    name = "fake_features"

    def __init__(self, fail=False):
        self.fail = fail

    def hydrate(self, query, candidates, features=None):
        if self.fail:
            raise ConnectionError("online store down")
        f = pd.DataFrame(np.nan, index=range(len(candidates)), columns=list(ALL_FEATURES))
        f["user_click_rate"] = [c.post_id / 100 for c in candidates]
        return f


class Boom(SideEffect):
    name = "boom"

    def apply(self, result):
        raise RuntimeError("stream full")


class SeenHydrator(QueryHydrator):
    name = "user_context"

    def hydrate(self, query):
        import dataclasses

        return dataclasses.replace(query, seen_posts=frozenset({59}), hated_authors=frozenset({19}))


def _rankers(version=1, heads=HEADS):
    return RankerSet(LightRankerScorer(Handle(("user_click_rate",), ("engaged",), version)),
                     HeavyRankerScorer(Handle(("user_click_rate",), heads, version)))


@pytest.fixture()
def make_pipeline():
    pool = ThreadPoolExecutor(2)

    def make(features=None, side_effects=(), realtime=None):
        metrics = MixerMetrics()

        def declare(rankers):
            return CandidatePipeline(
                query_hydrators=[SeenHydrator(), ExperimentArmQueryHydrator(CONFIG.experiment)],
                candidate_sources=[ListSource()],
                candidate_hydrators=[MetaHydrator()],
                filters=[PreviouslySeenFilter(), HatedAuthorFilter(), MaxAgeFilter(30), DuplicateFilter()],
                feature_hydrators=[features or ScoreByIdFeatures()] + ([realtime] if realtime else []),
                scoring=[
                    ScoringStage("light_ranker", scorers=[rankers.light]),
                    ScoringStage("heavy_ranker", selectors=[TopKSelector(10)], scorers=[rankers.heavy]),
                    ScoringStage("blender", scorers=[
                        WeightedSumBlender({a.name: a.weights for a in CONFIG.experiment.arms}, HEADS)]),
                ],
                selectors=[AuthorDiversitySelector(2), PageSelector()],
                side_effects=[*side_effects, RequestMetricsSideEffect(metrics)],
            )

        return HomeTimelinePipeline(config=CONFIG, declare=declare, rankers=_rankers(), executor=pool,
                                    metrics=metrics), metrics

    yield make
    pool.shutdown()


def test_stages_run_in_order_and_filters_apply(make_pipeline):
    pipeline, metrics = make_pipeline()
    res = pipeline.run(user_id=4, page_size=4)
    # 59 seen, 57/58 hated author 19; top K=10 by light score = 47..56; at most 2 per author
    ids = [c.post_id for c in res.items]
    assert ids[0] == 56 and len(ids) == 4 and 59 not in ids and 58 not in ids
    assert max(pd.Series([c.author_id for c in res.items]).value_counts()) <= 2
    assert res.counts == {"retrieved": 60, "hydrated": 60, "after_filters": 57, "heavy_ranked": 10, "selected": 4}
    assert res.filtered == {"previously_seen": 1, "hated_author": 2, "max_age": 0, "duplicate": 0}
    assert list(res.timings_ms) == ["query_hydration", "candidate_sources", "candidate_hydration", "filters",
                                    "feature_hydration", "light_ranker", "heavy_ranker", "blender", "selectors",
                                    "side_effects", "total"]
    assert res.timings_ms["total"] >= sum(v for k, v in res.timings_ms.items() if k != "total") * 0.99
    assert metrics.registry.get_sample_value("hm_mixer_filtered_total", {"filter": "hated_author"}) == 2


def test_feature_failure_and_side_effect_failure_fail_open(make_pipeline):
    pipeline, metrics = make_pipeline(features=ScoreByIdFeatures(fail=True), side_effects=[Boom()])
    res = pipeline.run(user_id=4, page_size=5)
    assert len(res.items) == 5 and res.degraded == ["feature_hydration"]
    # fail-open frame: NaN features, but the id buckets need no store and are still computed
    rows = pd.DataFrame(res.item_features(), columns=list(ALL_FEATURES))
    buckets = id_bucket_columns(4, [c.post_id for c in res.items], [c.author_id for c in res.items])
    for name in ID_FEATURES:
        np.testing.assert_array_equal(rows[name].to_numpy(), buckets[name])
    assert (rows[name] > 0).all()
    assert rows.drop(columns=list(ID_FEATURES)).isna().all().all()
    assert metrics.registry.get_sample_value("hm_mixer_side_effect_failures_total", {"side_effect": "boom"}) == 1
    assert metrics.registry.get_sample_value("hm_mixer_requests_total", {"status": "degraded"}) == 1


class RealtimeBoost(FeatureHydrator):
    """Stand-in real-time hydrator: raises, or lifts one post's feature to the top."""

    name, stage = "realtime", "realtime_features"

    def __init__(self, post=None):
        self.post = post

    def hydrate(self, query, candidates, features):
        if self.post is None:
            raise ConnectionError("redis went away")
        out = features.copy()
        out.loc[[c.post_id == self.post for c in candidates], "user_click_rate"] = 1e9
        return out


def test_realtime_features_feed_the_rankers_and_fail_open(make_pipeline):
    pipeline, _ = make_pipeline(realtime=RealtimeBoost(post=3))
    res = pipeline.run(user_id=4, page_size=4)
    assert res.items[0].post_id == 3 and "realtime_features" in res.timings_ms
    pipeline, _ = make_pipeline(realtime=RealtimeBoost())
    res = pipeline.run(user_id=4, page_size=4)
    assert res.degraded == ["realtime_features"] and res.items[0].post_id == 56  # the batch ranking


def test_cursor_pages_do_not_repeat_and_page_size_is_checked(make_pipeline):
    pipeline, _ = make_pipeline()
    first = pipeline.run(user_id=4, page_size=4)
    second = pipeline.run(user_id=4, page_size=4, cursor=first.next_cursor)
    assert not {c.post_id for c in first.items} & {c.post_id for c in second.items}
    assert second.query.page_index == 1
    with pytest.raises(ValueError, match="between 1 and 100"):
        pipeline.run(user_id=4, page_size=101)


class SwapDuring(ScoreByIdFeatures):
    """Feature hydrator that promotes new model versions while its request is in flight."""

    def __init__(self):
        super().__init__()
        self.pipeline = None

    def hydrate(self, query, candidates, features=None):
        if self.pipeline is not None:
            self.pipeline.swap_rankers(Handle(("user_click_rate",), ("engaged",), 2),
                                       Handle(("user_click_rate",), HEADS, 2))
            self.pipeline = None
        return super().hydrate(query, candidates, features)


def test_swap_rankers_is_atomic_per_request_and_checks_heads(make_pipeline):
    swapper = SwapDuring()
    pipeline, metrics = make_pipeline(features=swapper)
    before = pipeline.declaration
    swapper.pipeline = pipeline
    in_flight = pipeline.run(user_id=4, page_size=4)
    # the request that was running during the swap finished on the old versions, the next one is new
    assert in_flight.model_versions == {"light_ranker": "1", "heavy_ranker": "1"}
    assert pipeline.model_versions == {"light_ranker": "2", "heavy_ranker": "2"}
    assert pipeline.declaration is not before and pipeline.rankers.heavy.version == "2"
    assert pipeline.run(user_id=4, page_size=4).model_versions == {"light_ranker": "2", "heavy_ranker": "2"}
    assert metrics.registry.get_sample_value("hm_mixer_model_version_info",
                                             {"model": "heavy_ranker", "version": "2"}) == 1
    with pytest.raises(ValueError, match="heads"):
        pipeline.swap_rankers(Handle(("user_click_rate",), ("engaged",), 3), Handle(("user_click_rate",), ("click",), 3))
    assert pipeline.model_versions == {"light_ranker": "2", "heavy_ranker": "2"}
