"""monitoring.drift / monitoring.reference: Evidently drift per column, null shares, the gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from monitoring.drift import compute_drift, write_summary
from monitoring.reference import build_reference, feature_view_of, monitored_features, score_column


def _window(n: int, seed: int) -> pd.DataFrame:
    """Rows of every monitored feature (independent, realistic shapes), scores and labels."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f: rng.gamma(2.0, 1.0, n) for f in monitored_features()})
    frame["post_duration_ms"] = rng.lognormal(10, 0.5, n)
    for j, h in enumerate(HEADS):
        p = rng.beta(2, 5 + 10 * j, n)
        frame[score_column(h)] = p
        frame[h] = (rng.random(n) < p).astype("int64")
    frame["tab"] = rng.choice([0, 1, 4], n)
    frame["date"] = 20220501
    return frame


@pytest.fixture(scope="module")
def windows():
    return _window(2500, 1), _window(2000, 2)


def test_same_distribution_does_not_drift_and_passes_the_gate(windows, tmp_path):
    ref, cur = windows
    summary = compute_drift(ref, cur, html_path=tmp_path / "r.html")
    assert summary.passed and summary.drift_share < 0.1
    assert (tmp_path / "r.html").stat().st_size > 10_000  # Evidently's report with its plots
    assert {c.view for c in summary.features} >= {"user_features", "content_features", "request"}
    assert len(summary.predictions) == len(HEADS)


def test_a_unit_change_and_new_nulls_are_flagged_exactly(windows):
    ref, cur = windows
    bad = cur.copy()
    bad["post_duration_ms"] *= 1000  # ms -> us
    bad.loc[np.random.default_rng(0).random(len(bad)) < 0.2, "user_lt_click_rate"] = np.nan
    summary = compute_drift(ref, bad)
    flagged = {c.column: c for c in summary.drifted_features()}
    assert set(flagged) == {"post_duration_ms", "user_lt_click_rate"}
    nulls = flagged["user_lt_click_rate"]
    assert nulls.method == "null share" and nulls.null_share_current == pytest.approx(0.2, abs=0.03)
    assert nulls.distribution_method is not None  # the distribution test alone would not see it
    unit = flagged["post_duration_ms"]
    assert unit.method != "null share" and unit.drifted


def test_the_gate_fails_when_the_share_of_drifted_features_passes_it(windows):
    ref, cur = windows
    shifted = cur.copy()
    features = list(monitored_features())
    for f in features[: len(features) // 2]:
        shifted[f] = shifted[f] * 3 + 5
    summary = compute_drift(ref, shifted, max_drift_share=0.3)
    assert summary.drift_share == pytest.approx(sum(c.drifted for c in summary.features) / len(features))
    assert summary.drift_share >= 0.45 and not summary.passed
    assert compute_drift(ref, shifted, max_drift_share=0.9).passed


def test_prediction_and_label_drift_are_reported(windows):
    ref, cur = windows
    cur = cur.copy()
    cur[score_column("click")] = np.clip(cur[score_column("click")] + 0.3, 0, 1)  # overconfident scores
    summary = compute_drift(ref, cur)
    assert [c.column for c in summary.predictions if c.drifted] == [score_column("click")]
    click = summary.labels["click"]
    assert click["current_ece"] > click["reference_ece"] + 0.2
    assert click["current_rate"] == pytest.approx(cur["click"].mean())


def test_psi_for_every_column_and_a_json_summary_without_nan(windows, tmp_path):
    ref, cur = windows
    bad = cur.copy()
    bad["post_duration_ms"] *= 1000
    bad["user_impressions"] = np.nan  # no values at all: only the null share can speak
    summary = compute_drift(ref, bad, method="psi")
    methods = {c.method for c in summary.features if c.column not in ("user_impressions",)}
    assert methods == {"psi"}
    empty = next(c for c in summary.features if c.column == "user_impressions")
    assert empty.drifted and empty.method == "null share" and empty.distribution_method is None
    data = json.loads(write_summary(summary, tmp_path / "s.json").read_text())
    assert data["passed"] == summary.passed and len(data["features"]) == len(summary.features)
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text


def test_reference_sample_and_profile(windows):
    ref, _ = windows
    def scores(rows):
        return rows[[score_column(h) for h in HEADS]].to_numpy()

    profile = build_reference(ref, scores, max_rows=1000, description="test")
    assert len(profile.sample) == 1000 and set(monitored_features()) <= set(profile.sample.columns)
    p = profile.profile
    assert p["rows"] == 1000 and p["description"] == "test"
    assert p["heads"]["click"]["label_rate"] == pytest.approx(profile.sample["click"].mean())
    assert math.isclose(sum(p["surface_mix"].values()), 1.0)
    assert p["features"]["content_features"]["post_duration_ms"]["null_share"] == 0.0
    with pytest.raises(ValueError, match="do not match"):
        build_reference(ref, lambda rows: scores(rows)[:10])
    with pytest.raises(KeyError, match="lacks monitored feature"):
        build_reference(ref.drop(columns=["post_duration_ms"]), scores)
    assert feature_view_of("ut_click_rate") == "user_tag_features" and feature_view_of("req_hour_of_day") == "request"
