"""Experiments as configuration: per-arm rankers and candidate sources, the holdout, and shadow
scoring (issue 22, must-haves 1-2), on the pipeline runner with in-memory components; the shadow
log is written to a real Redis."""

from __future__ import annotations

import dataclasses
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from core import online_layout as keys
from core.schema import ALL_FEATURES, HEADS
from mixer.blenders import WeightedSumBlender
from mixer.candidate import Candidate, Query
from mixer.components import CandidateHydrator, CandidateSource, FeatureHydrator
from mixer.config import ConfigError, load_config, parse_config
from mixer.metrics import MixerMetrics
from mixer.pipeline import HomeTimelinePipeline, RankerSet, ServedModels
from mixer.pipeline_runner import CandidatePipeline, ScoringStage
from mixer.query_hydrators import ExperimentArmQueryHydrator
from mixer.query_hydrators.experiment_arm import assign_arm
from mixer.selectors import AuthorDiversitySelector, PageSelector, TopKSelector
from mixer.side_effects import ShadowRunner, ShadowScoringSideEffect

BASE = load_config()
NOW = BASE.clock.now_s()
W = {"click": 1.0, "long_view": 2.0, "like": 4.0}


def _config(**experiment):
    data = BASE.model_dump(mode="json")
    data["experiment"] = {"id": "exp", "salt": "s1", **experiment}
    return parse_config(data)


def _arms(**extra):
    return [{"name": "control", "traffic_share": 0.5, "weights": W},
            {"name": "treatment", "traffic_share": 0.5, "weights": W, **extra}]


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("experiment, message", [
    ({"arms": _arms(sources={"populer": {"max_candidates": 5}})}, "unknown candidate sources ['populer']"),
    ({"arms": _arms(models={"heavy_ranker": "champion v2"})}, "models.heavy_ranker"),
    ({"arms": [*_arms(), {"name": "holdout", "traffic_share": 0.0, "weights": W}]}, "reserved for the holdout"),
    ({"arms": _arms(), "holdout": {"share": 0.1, "salt": "h", "serves": "nobody"}}, "holdout.serves 'nobody'"),
    ({"arms": [{"name": "a", "traffic_share": 0.3, "weights": W},
               {"name": "b", "traffic_share": 0.3, "weights": W, "models": {"heavy_ranker": "challenger"}},
               {"name": "i", "traffic_share": 0.4, "interleave": ["a", "b"]}]}, "serves other models"),
    ({"arms": _arms(), "shadow": {"heavy_ranker": "challenger", "share": 0}}, "shadow.share"),
])
def test_invalid_experiments_are_refused_with_the_key_and_the_fix(experiment, message):
    with pytest.raises(ConfigError, match="invalid mixer config") as e:
        _config(**experiment)
    assert message in str(e.value)


def test_the_holdout_keeps_its_users_whatever_the_experiment_and_serves_as_its_arm():
    cfg = _config(arms=_arms(), holdout={"share": 0.2, "salt": "long-term", "serves": "control"})
    exp = cfg.experiment
    assert exp.assignment_shares() == pytest.approx({"control": 0.4, "treatment": 0.4, "holdout": 0.2})
    held = exp.served_arms[-1]
    assert held.name == "holdout" and held.weights == exp.arms[0].weights and held.models.heavy_ranker is None
    users = range(20_000)
    arms = [assign_arm(exp, u) for u in users]
    share = arms.count("holdout") / len(arms)
    assert 0.19 < share < 0.21
    # a new experiment (other salt, other arms) holds out exactly the same users
    other = _config(salt="s2", arms=[{"name": "x", "traffic_share": 1.0, "weights": W}],
                    holdout={"share": 0.2, "salt": "long-term", "serves": "x"}).experiment
    assert [u for u, a in zip(users, arms) if a == "holdout"] == [u for u in users if assign_arm(other, u) == "holdout"]
    # the arms split the rest by their shares
    treated = arms.count("treatment") / (len(arms) - arms.count("holdout"))
    assert 0.48 < treated < 0.52


# ---------------------------------------------------------------- the pipeline with per-arm models and sources
@dataclass
class Handle:
    """A ranker whose every head is ``scale * user_click_rate`` (higher post id -> higher score)."""

    version: int
    scale: float = 1.0
    feature_names: tuple = ("user_click_rate",)
    heads: tuple = HEADS
    calls: int = 0

    def predict(self, frame):
        self.calls += 1
        x = frame["user_click_rate"].to_numpy() * self.scale
        return np.stack([x] * len(self.heads), axis=1).astype(np.float32)


class CountingSource(CandidateSource):
    """Posts 0..max_candidates-1 (or its arm's limit), in order."""

    timeout_ms = 500

    def __init__(self, name: str, max_candidates: int, start: int = 0):
        self.name, self.max_candidates, self.start = name, max_candidates, start

    def fetch(self, query):
        from mixer.candidate_sources.base import source_limit

        n = source_limit(self, query)
        return [Candidate(post_id=self.start + i, source=self.name) for i in range(n)]


class Meta(CandidateHydrator):
    name = "post_metadata"

    def hydrate(self, query, candidates):
        for c in candidates:
            c.author_id, c.created_ts = c.post_id, NOW - 60.0
        return candidates, 0


class ById(FeatureHydrator):
    name, stage = "fake_features", "feature_hydration"

    def hydrate(self, query, candidates, features=None):
        f = pd.DataFrame(np.nan, index=range(len(candidates)), columns=list(ALL_FEATURES))
        f["user_click_rate"] = [c.post_id / 1000 for c in candidates]
        return f


def _user_in(exp, arm: str) -> int:
    return next(u for u in range(10_000) if assign_arm(exp, u) == arm)


def _declare(cfg, side_effects=lambda rankers, blender: []):
    arms = cfg.experiment.served_arms

    def declare(rankers):
        blender = WeightedSumBlender({a.name: a.weights for a in arms if a.interleave is None}, HEADS)
        return CandidatePipeline(
            query_hydrators=[ExperimentArmQueryHydrator(cfg.experiment)],
            candidate_sources=[CountingSource("popular", 30), CountingSource("trending", 10, start=1000)],
            candidate_hydrators=[Meta()],
            feature_hydrators=[ById()],
            scoring=[ScoringStage("light_ranker", scorers=[rankers.light]),
                     ScoringStage("heavy_ranker", selectors=[TopKSelector(20)], scorers=[rankers.heavy]),
                     ScoringStage("blender", scorers=[blender])],
            selectors=[AuthorDiversitySelector(100), PageSelector()],  # sorts by the blended score
            side_effects=side_effects(rankers, blender),
        )

    return declare


def _pipeline(cfg, models: ServedModels, side_effects=lambda rankers, blender: []):
    pool = ThreadPoolExecutor(4)
    return HomeTimelinePipeline(config=cfg, declare=_declare(cfg, side_effects), rankers=RankerSet.of(models),
                                executor=pool, metrics=MixerMetrics()), pool


def test_an_arm_serves_its_own_rankers_and_sources_and_logs_their_versions():
    cfg = _config(arms=_arms(models={"heavy_ranker": "challenger"},
                             sources={"trending": {"enabled": False}, "popular": {"max_candidates": 12}}))
    served, challenger = Handle(3), Handle(7, scale=-1.0)  # the challenger reverses the order
    pipeline, pool = _pipeline(cfg, ServedModels(Handle(2), served, heavy_by_arm={"treatment": challenger}))
    try:
        assert pipeline.model_versions == {"light_ranker": "2", "heavy_ranker": "3", "heavy_ranker:treatment": "7"}
        control = pipeline.run(_user_in(cfg.experiment, "control"), page_size=20)
        treated = pipeline.run(_user_in(cfg.experiment, "treatment"), page_size=20)
    finally:
        pool.shutdown()
    assert control.query.arm == "control" and treated.query.arm == "treatment"
    assert control.model_versions["heavy_ranker"] == "3" and treated.model_versions["heavy_ranker"] == "7"
    assert {r.name for r in control.source_results} == {"popular", "trending"}
    assert [r.name for r in treated.source_results] == ["popular"]  # trending off for the arm
    assert control.counts["retrieved"] == 40 and treated.counts["retrieved"] == 12
    ids = [c.post_id for c in treated.items]
    assert ids == sorted(ids)  # the challenger's reversed scores ranked the treatment's page
    assert [c.post_id for c in control.items][0] == max(c.post_id for c in control.items)


def test_arm_models_must_predict_the_served_heads():
    with pytest.raises(ValueError, match="every arm must predict the same heads"):
        RankerSet.of(ServedModels(Handle(1), Handle(1), heavy_by_arm={"treatment": Handle(2, heads=("click",))}))


# ---------------------------------------------------------------- shadow scoring
class SlowHandle(Handle):
    def __init__(self, version, gate: threading.Event, **kw):
        super().__init__(version, **kw)
        self.gate = gate

    def predict(self, frame):
        self.gate.wait(10)
        return super().predict(frame)


def test_shadow_scoring_logs_the_challengers_ranks_beside_the_served_and_never_changes_the_page(redis_client):
    cfg = _config(arms=_arms(), shadow={"heavy_ranker": "challenger", "share": 1.0, "queue_size": 2})
    outcomes: list[str] = []
    runner = ShadowRunner(2, outcomes.append)
    gate = threading.Event()
    challenger = SlowHandle(9, gate, scale=-1.0)

    def effects(rankers, blender):
        return [ShadowScoringSideEffect(rankers.shadow, blender, runner, redis_client, 1.0, 1000)]

    pipeline, pool = _pipeline(cfg, ServedModels(Handle(1), Handle(1), shadow_heavy=challenger), effects)
    try:
        baseline, _ = _pipeline(cfg, ServedModels(Handle(1), Handle(1)))
        user = _user_in(cfg.experiment, "control")
        # the challenger is blocked: the 1st request runs on the thread, the 2nd waits, 2 slots are taken
        results = [pipeline.run(user, page_size=10) for _ in range(4)]
        assert outcomes == ["dropped", "dropped"]
    finally:
        gate.set()
        assert runner.drain(10)
        runner.close()
        pool.shutdown()
    plain = baseline.run(user, page_size=10)
    for r in results:  # the page is the served ranker's, as without a shadow
        assert [c.post_id for c in r.items] == [c.post_id for c in plain.items]
        assert all(c.score == p.score for c, p in zip(r.items, plain.items))
    assert outcomes.count("scored") == 2 and outcomes.count("dropped") == 2 and challenger.calls == 2
    entries = redis_client.xrange(keys.SHADOW_LOG)
    assert len(entries) == 2
    fields = {k.decode(): v.decode() for k, v in entries[0][1].items()}
    assert fields["served_version"] == "1" and fields["challenger_version"] == "9" and fields["arm"] == "control"
    posts = json.loads(fields["posts"])
    assert len(posts) == 20  # the heavy-ranked candidates
    served_scores = [p[1] for p in posts]
    assert served_scores == sorted(served_scores, reverse=True)  # listed in the served ranking's order
    assert [p[3] for p in posts] == list(range(19, -1, -1))  # the reversing challenger ranks them last-first
    assert [p[4] for p in posts[:10]] == list(range(10)) and all(p[4] == -1 for p in posts[10:])


def test_shadow_sampling_is_by_request_and_off_without_a_challenger(redis_client):
    from mixer.side_effects.shadow_scoring import request_sampled

    ids = [f"{i:032x}" for i in range(4000)]
    share = sum(request_sampled(i, 0.1) for i in ids) / len(ids)
    assert 0.085 < share < 0.115
    assert [request_sampled(i, 0.1) for i in ids[:50]] == [request_sampled(i, 0.1) for i in ids[:50]]
    blender = WeightedSumBlender({"control": W}, HEADS)
    off = ShadowScoringSideEffect(None, blender, ShadowRunner(1), redis_client, 1.0, 10)
    assert not off.enabled(Query(user_id=1, page_size=5, now_s=NOW, request_id="r"))
    with pytest.raises(ValueError, match="does not predict heads"):
        from mixer.scorers import HeavyRankerScorer

        ShadowScoringSideEffect(HeavyRankerScorer(Handle(2, heads=("hate",))), blender, ShadowRunner(1),
                                redis_client, 1.0, 10)


# ---------------------------------------------------------------- hot reload
def test_a_changed_experiment_is_served_without_a_restart_and_a_bad_one_is_not(tmp_path):
    import yaml

    from mixer.config_watcher import ExperimentConfigWatcher

    path = tmp_path / "mixer.yaml"
    first = {"experiment": {"id": "e1", "salt": "s", "arms": [{"name": "control", "traffic_share": 1.0, "weights": W}]}}
    path.write_text(yaml.safe_dump(first))
    cfg = load_config(path)
    challenger = Handle(8, scale=-1.0)
    loaded = []

    def load_models(config):
        loaded.append(config.experiment.id)
        heavy = {a.name: challenger for a in config.experiment.arms if a.models.heavy_ranker}
        return {}, heavy, None

    pipeline, pool = _pipeline(cfg, ServedModels(Handle(1), Handle(1)))
    outcomes = []
    swaps = []
    watcher = ExperimentConfigWatcher(path, pipeline, load_models, _declare, 60, outcomes.append,
                                      after_swap=lambda: swaps.append(pipeline.config.experiment.id))
    try:
        assert watcher.check_once() is None  # unchanged
        user = 42
        assert pipeline.run(user, page_size=5).query.arm == "control"
        second = {"experiment": {"id": "e2", "salt": "s", "arms": [
            {"name": "control", "traffic_share": 0.0, "weights": W},
            {"name": "challenger", "traffic_share": 1.0, "weights": W, "models": {"heavy_ranker": "challenger"}}]}}
        path.write_text(yaml.safe_dump(second))
        assert watcher.check_once() == "applied" and loaded == ["e2"]
        result = pipeline.run(user, page_size=5)
        assert result.query.arm == "challenger" and result.model_versions["heavy_ranker"] == "8"
        assert pipeline.config.experiment.id == "e2" and pipeline.model_versions["heavy_ranker:challenger"] == "8"

        path.write_text("experiment: {id: e3, salt: s, arms: [{name: x, traffic_share: 0.7, weights: {click: 1}}]}")
        assert watcher.check_once() == "invalid"  # shares sum to 0.7
        bad_heads = {"experiment": {"id": "e4", "salt": "s", "arms": [
            {"name": "x", "traffic_share": 1.0, "weights": W, "models": {"heavy_ranker": "challenger"}}]}}
        challenger.heads = ("click",)  # the model it names does not predict the weighted heads
        path.write_text(yaml.safe_dump(bad_heads))
        assert watcher.check_once() == "failed"
        assert swaps == ["e2"]  # after the applied experiment only, not the invalid or failed ones
        challenger.heads = HEADS
        assert pipeline.config.experiment.id == "e2" and pipeline.run(user, page_size=5).query.arm == "challenger"

        path.write_text(yaml.safe_dump({**second, "page": {"default_size": 7}}))
        assert watcher.check_once() == "restart_needed"  # outside `experiment`: not applied
        assert pipeline.config.page.default_size == cfg.page.default_size
    finally:
        pool.shutdown()
    assert outcomes == ["applied", "invalid", "failed", "restart_needed"]
