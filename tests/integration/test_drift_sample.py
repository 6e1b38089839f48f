"""The production sample: the mixer side effect writes sampled requests' candidates to Redis, and
monitoring reads them back exactly (real Redis)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import online_layout as keys
from core.schema import ALL_FEATURES, HEADS
from mixer.candidate import Candidate, Query
from mixer.components import TimelineResult
from mixer.side_effects.drift_sample import DriftSampleSideEffect, sampled
from monitoring.production import read_production_sample
from monitoring.reference import score_column


def _result(request_id: str, n: int = 30) -> TimelineResult:
    rng = np.random.default_rng(1)
    ranked = [Candidate(post_id=100 + i, source="popular" if i % 2 else "in_network", author_id=900 + i,
                        light_score=float(i), score=float(-i),
                        heads={h: float(rng.random()) for h in HEADS} if i < 25 else {}) for i in range(n)]
    features = pd.DataFrame(rng.normal(size=(n, len(ALL_FEATURES))), columns=list(ALL_FEATURES))
    features.iloc[0, 3] = np.nan
    query = Query(user_id=7, page_size=10, now_s=1_651_680_000.25, request_id=request_id, surface=4, arm="control")
    return TimelineResult(query=query, items=ranked[:10], next_cursor=None, timings_ms={}, source_results=[],
                          filtered={}, counts={}, model_versions={"light_ranker": "2", "heavy_ranker": "3"},
                          ranked=ranked, features=features)


def test_sampling_is_by_request_and_near_the_rate():
    ids = [f"{i:032x}" for i in range(20_000)]
    share = np.mean([sampled(r, 0.01) for r in ids])
    assert 0.007 < share < 0.013
    assert all(sampled(r, 0.01) == sampled(r, 0.01) for r in ids[:100])  # the same answer in every worker
    assert not any(sampled(r, 0.0) for r in ids[:100]) and all(sampled(r, 1.0) for r in ids[:100])


def test_sampled_candidates_round_trip_with_features_and_scores(redis_client):
    redis_client.delete(keys.DRIFT_SAMPLE)
    effect = DriftSampleSideEffect(redis_client, rate=1.0, per_request=20, maxlen=1000, wall_clock=lambda: 5.0)
    result = _result("r1")
    assert effect.enabled(result.query)
    effect.apply(result)
    frame = read_production_sample(redis_client)
    assert len(frame) == 20  # 20 of the 25 heavy-ranked candidates, none of the light-only ones
    assert set(frame["post_id"]) <= {100 + i for i in range(25)} and frame["post_id"].is_unique
    by_post = {c.post_id: (i, c) for i, c in enumerate(result.ranked)}
    for _, row in frame.iterrows():
        i, c = by_post[row["post_id"]]
        np.testing.assert_array_equal(row[list(ALL_FEATURES)].to_numpy(dtype=float),
                                      result.features.iloc[i].to_numpy())
        assert [row[score_column(h)] for h in HEADS] == pytest.approx([c.heads[h] for h in HEADS])
        assert (row["source"], row["author_id"], row["light_score"], row["score"]) == (c.source, c.author_id,
                                                                                      c.light_score, c.score)
    first = frame.iloc[0]
    assert (first["request_id"], first["user_id"], first["tab"], first["arm"]) == ("r1", 7, 4, "control")
    assert (first["heavy_ranker_version"], first["sampled_at"]) == ("3", 5.0)


def test_rate_zero_writes_nothing_and_the_window_bounds_apply(redis_client):
    redis_client.delete(keys.DRIFT_SAMPLE)
    off = DriftSampleSideEffect(redis_client, rate=0.0, per_request=5, maxlen=1000)
    assert not off.enabled(_result("r2").query)
    on = DriftSampleSideEffect(redis_client, rate=1.0, per_request=5, maxlen=1000)
    on.apply(_result("r3"))
    now = redis_client.time()[0]
    assert len(read_production_sample(redis_client, since_s=now - 60)) == 5
    assert read_production_sample(redis_client, since_s=now + 60).empty
    with pytest.raises(ValueError, match="rate"):
        DriftSampleSideEffect(redis_client, rate=1.5, per_request=5, maxlen=10)


def test_the_drift_job_reads_the_window_and_the_one_before_as_its_rolling_reference(redis_client, redis_server,
                                                                                      tmp_path, monkeypatch):
    from core.state import StateDir
    from home_mixer.drift_job import production_window

    redis_client.delete(keys.DRIFT_SAMPLE)
    DriftSampleSideEffect(redis_client, rate=1.0, per_request=20, maxlen=1000, wall_clock=lambda: 5.0).apply(
        _result("now"))
    # the same entries as sampled 90 minutes ago too (stream ids are the server's clock in ms; a
    # stream takes ids in order, so the stream is rewritten older copy first)
    now_ms = redis_client.time()[0] * 1000
    current = redis_client.xrange(keys.DRIFT_SAMPLE)
    old = [(f"{now_ms - 90 * 60_000}-{k}", fields) for k, (_, fields) in enumerate(current)]
    redis_client.delete(keys.DRIFT_SAMPLE)
    for entry_id, fields in [*old, *current]:
        redis_client.xadd(keys.DRIFT_SAMPLE, fields, id=entry_id)
    monkeypatch.setenv("HOME_MIXER_REDIS_URL", redis_server.url)
    frame, before = production_window(StateDir(tmp_path).ensure(), 3600.0)
    assert len(frame) == 20 and len(before) == 20  # the hour before holds the copy of 90 minutes ago
    assert (frame["request_id"] == "now").all() and len(before.merge(frame, on=["post_id", "user_id"])) == 20
    frame, before = production_window(StateDir(tmp_path).ensure(), 1800.0)
    assert len(frame) == 20 and len(before) == 0  # the half hour before has nothing
