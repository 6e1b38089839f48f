"""The experiment readout (monitoring.experiment_report) on simulated experiments whose truth is
known: A/A runs must pass and hold 0 in their lift interval, a real lift must be found with its
sign, a skewed assignment must be flagged, and a slow arm must breach its guardrail."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from monitoring.experiment_report import (
    ExperimentDataError, label_served, ratio_of_sums, readout, relative_lift, write_report, Interval)

HEADS = ("click", "like")


def simulate(seed: int, users: int = 2000, lift: float = 0.0, treatment_share: float = 0.5,
             treatment_ms: float = 30.0) -> pd.DataFrame:
    """Users with their own click propensity (beta) and 1-15 requests of 5 posts; treatment
    multiplies click probabilities by (1 + lift)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        arm = "treatment" if rng.random() < treatment_share else "control"
        base = rng.beta(2, 8)
        p_click = min(1.0, base * (1 + lift) if arm == "treatment" else base)
        for r in range(rng.integers(1, 16)):
            ms = rng.gamma(4, (treatment_ms if arm == "treatment" else 30.0) / 4)
            for pos in range(5):
                rows.append((f"{u}-{r}", u, arm, float(rng.random() < p_click), float(rng.random() < 0.05), ms))
    f = pd.DataFrame(rows, columns=["request_id", "user_id", "arm", "click", "like", "pipeline_ms"])
    f["degraded"] = ""
    f["fallback"] = 0
    f["labelled"] = True
    return f


SHARES = {"control": 0.5, "treatment": 0.5}


def test_aa_runs_pass_and_their_lift_intervals_hold_zero():
    holds = 0
    for seed in range(20):
        r = readout(simulate(seed, users=1500), SHARES, experiment="aa", heads=HEADS)
        assert not r.srm
        t = next(a for a in r.arms if a.arm == "treatment")
        holds += t.lift["click"].low <= 0 <= t.lift["click"].high
    assert holds >= 18


def test_a_real_lift_is_found_with_its_sign_and_size():
    r = readout(simulate(1, lift=0.15), SHARES, experiment="ab", heads=HEADS)
    t = next(a for a in r.arms if a.arm == "treatment")
    assert t.lift["click"].low > 0 and t.lift["click"].value == pytest.approx(0.15, abs=0.07)
    worse = readout(simulate(2, lift=-0.15), SHARES, experiment="ab", heads=HEADS)
    assert next(a for a in worse.arms if a.arm == "treatment").lift["click"].high < 0
    assert r.passed  # a lift is not a failure


def test_a_skewed_assignment_is_a_sample_ratio_mismatch():
    r = readout(simulate(3, users=4000, treatment_share=0.45), SHARES, experiment="srm", heads=HEADS)
    assert r.srm and not r.passed and r.srm_p_value < 0.001


def test_a_slow_arm_breaches_the_latency_guardrail():
    r = readout(simulate(4, treatment_ms=60.0), SHARES, experiment="slow", heads=HEADS)
    assert not r.passed and any("p99 pipeline time" in b and "treatment" in b for b in r.breaches)
    degraded = simulate(5)
    degraded.loc[degraded["arm"] == "treatment", "degraded"] = "realtime_features"
    r = readout(degraded, SHARES, experiment="deg", heads=HEADS)
    assert any("degraded share" in b for b in r.breaches)


def test_the_delta_method_matches_a_bootstrap_over_users():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 40, 3000).astype(float)
    x = rng.binomial(n.astype(int), rng.beta(2, 8, 3000)).astype(float)
    est = ratio_of_sums(x, n)
    boots = [x[i].sum() / n[i].sum() for i in (rng.integers(0, 3000, 3000) for _ in range(400))]
    assert est.std_error == pytest.approx(np.std(boots), rel=0.15)
    assert est.value == pytest.approx(x.sum() / n.sum())


def test_lift_of_zero_rates_is_nan_not_an_error():
    assert np.isnan(relative_lift(Interval(0.0, 0.0), Interval(0.1, 0.01)).value)


def test_bad_inputs_name_the_problem():
    f = simulate(6, users=50)
    with pytest.raises(ExperimentDataError, match="no served impressions"):
        readout(f.iloc[:0], SHARES, experiment="x", heads=HEADS)
    with pytest.raises(ExperimentDataError, match="not in the experiment config"):
        readout(f, {"control": 1.0}, experiment="x", heads=HEADS)
    with pytest.raises(ExperimentDataError, match="control arm 'other'"):
        readout(f, {**SHARES, "other": 0.0}, experiment="x", control="other", heads=HEADS)


def test_labels_come_from_the_first_impression_in_the_window():
    served = pd.DataFrame({"request_id": ["a", "a", "b"], "user_id": [1, 1, 2], "post_id": [10, 11, 10],
                           "as_of": [1000.0, 1000.0, 1000.0]})
    t = pd.to_datetime
    impressions = pd.DataFrame({"user_id": [1, 1, 2], "post_id": [10, 11, 10],
                                "event_ts": [t(1500, unit="s", utc=True), t(999, unit="s", utc=True),
                                             t(1000 + 7200, unit="s", utc=True)],
                                "click": [1, 1, 1], "like": [0, 1, 0]})
    out = label_served(served, impressions, window_s=3600, heads=HEADS)
    assert out["click"].tolist() == [1.0, 0.0, 0.0]  # before the serve, or past the window: not engaged
    assert out["labelled"].tolist() == [True, False, False]


def test_the_report_files(tmp_path):
    r = readout(simulate(7, users=300, lift=0.2), SHARES, experiment="files", heads=HEADS)
    j, h = write_report(r, tmp_path, heads=HEADS)
    data = json.loads(j.read_text())
    assert data["experiment"] == "files" and {a["arm"] for a in data["arms"]} == {"control", "treatment"}
    assert data["arms"][1]["lift"]["click"]["ci_low"] <= data["arms"][1]["lift"]["click"]["value"]
    page = h.read_text()
    assert "experiment files" in page and "plotly" in page and "treatment" in page
