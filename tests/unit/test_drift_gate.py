"""The drift gate: declared forms of growing features, the rolling reference, and the fault rules."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from pydantic import ValidationError

from core.request_features import LOCAL_UTC_OFFSET_HOURS, surface_indicators
from core.schema import SURFACE_FEATURES
from monitoring.drift import DriftGateConfig, compute_drift
from monitoring.drift_eval import FAULT_KINDS, detected, gate_faulted_day, inject
from monitoring.drift_forms import (
    CALENDAR, DRIFT_FORMS, PER_DAY, RAW, RECENT, TRAINING, comparison_form, growing_features, history_origin,
)
from monitoring.reference import monitored_features
from tests.dev_frame import build_dev_frame

DAYS = (20220425, 20220426, 20220427, 20220428, 20220429, 20220430)
ORIGIN = history_origin(pd.Timestamp("2022-04-24T16:05:00Z"))  # the local day 2022-04-25 starts at 16:00 UTC
# growing by construction, stationary, request context, calendar: one of each form and reference
FEATURES = ["user_impressions", "post_impressions_total", "req_post_age_hours", "user_lt_active_days",
            "user_click_rate", "post_duration_ms", "user_follow_num", "req_day_of_week", *SURFACE_FEATURES]


def _log(rows_per_day: int = 3000, seed: int = 0) -> pd.DataFrame:
    """Served rows of six days in which cumulative counts and post age grow by construction (each a
    fixed per-entity rate x days since the origin) and everything else is stationary."""
    rng = np.random.default_rng(seed)
    users, posts = 400, 300
    activity, clicks, follows = rng.gamma(2.0, 1.0, users), rng.beta(2, 5, users), rng.lognormal(4, 1, users)
    popularity, duration, created = rng.gamma(2.0, 1.0, posts), rng.lognormal(10, 0.5, posts), rng.uniform(100, 500, posts)
    frames = []
    for i, d in enumerate(DAYS):
        u = rng.integers(0, users, rows_per_day)
        p = rng.integers(0, posts, rows_per_day)
        ts = ORIGIN + pd.Timedelta(days=i) + pd.to_timedelta(rng.uniform(0, 86400, rows_per_day), unit="s")
        elapsed = ((ts - ORIGIN).total_seconds() / 86400).to_numpy()
        frame = pd.DataFrame({
            "date": d, "request_ts": ts, "user_id": u, "post_id": p,
            "user_impressions": np.floor(20 * activity[u] * elapsed),
            "post_impressions_total": np.floor(50 * popularity[p] * elapsed),
            "req_post_age_hours": elapsed * 24 + created[p],
            "user_lt_active_days": np.floor(elapsed) * np.minimum(activity[u] / 4, 1),
            "user_click_rate": clicks[u], "post_duration_ms": duration[p], "user_follow_num": follows[u],
            "req_day_of_week": float((ts[0] + pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)).dayofweek),
        })
        tabs = pd.Series(rng.choice([0, 1, 2, 4, 6], rows_per_day, p=[0.09, 0.76, 0.03, 0.06, 0.06]))
        for name, values in surface_indicators(tabs, rows_per_day).items():
            frame[name] = values
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def log():
    return _log()


def _windows(log: pd.DataFrame, day: int = DAYS[-1]):
    """(training reference: every earlier day, recent reference: the day before, the day itself)."""
    return log[log["date"] < day], log[log["date"] == day - 1], log[log["date"] == day]


def test_a_normal_day_fails_raw_against_training_and_passes_in_declared_forms(log):
    training, recent, day = _windows(log)
    before = compute_drift(training, day, features=FEATURES)
    grown = {"user_impressions", "post_impressions_total", "req_post_age_hours", "user_lt_active_days"}
    assert grown <= {c.column for c in before.drifted_features()}
    assert not before.passed and before.drift_share > before.max_drift_share
    after = compute_drift(training, day, recent=recent, origin=ORIGIN, features=FEATURES)
    assert after.passed and after.drifted_features() == [] and after.reasons() == []
    by = {c.column: c for c in after.features}
    assert by["user_impressions"].form == PER_DAY and by["user_impressions"].against == RECENT
    assert by["post_duration_ms"].against == TRAINING and by["req_day_of_week"].form == CALENDAR
    assert after.reference["recent"]["rows"] == len(recent)
    # without a rolling reference the forms still apply, against the training days
    assert compute_drift(training, day, origin=ORIGIN, features=FEATURES).passed


# the rule each fault must trip, on a feature of each kind
EXPECTED = {
    "scale": ("post_duration_ms", "scale"), "unit": ("req_post_age_hours", "scale"),
    "nulls": ("user_click_rate", "nulls"), "stale": ("user_impressions", "stale"),
    "category": (None, "category mix"), "dropped": ("user_follow_num", "missing"),
}


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_injected_fault_fails_the_gate_with_its_reason_named(log, kind):
    training, recent, day = _windows(log)
    feature, rule = EXPECTED[kind]
    bad = inject(day, kind, feature, history=log[log["date"] < DAYS[-1]], seed=1)
    summary = compute_drift(training, bad, recent=recent, origin=ORIGIN, features=FEATURES)
    assert not summary.passed
    named = {(f.rule, f.column) for f in summary.faults}
    if feature is None:
        assert any(r == rule and c in SURFACE_FEATURES for r, c in named)
    else:
        assert (rule, feature) in named
    assert any(r.startswith(f"{rule}: ") for r in summary.reasons())
    assert summary.to_dict()["reasons"] == summary.reasons()


def test_a_sparse_feature_losing_two_fifths_of_its_values_is_a_nulls_fault(log):
    training, recent, day = _windows(log)
    sparse = lambda f: f.assign(user_click_rate=f["user_click_rate"].where(np.arange(len(f)) % 30 == 0))  # noqa: E731
    bad = sparse(day)
    bad["user_click_rate"] = bad["user_click_rate"].mask(np.random.default_rng(2).random(len(bad)) < 0.4)
    summary = compute_drift(sparse(training), bad, recent=sparse(recent), origin=ORIGIN, features=FEATURES)
    nulls = [f for f in summary.faults if f.rule == "nulls" and f.column == "user_click_rate"]
    assert nulls and nulls[0].value < 0.05  # the null share moved less than the absolute tolerance
    assert compute_drift(sparse(training), sparse(day), recent=sparse(recent), origin=ORIGIN,
                         features=FEATURES).passed


def test_a_constant_feature_is_a_fault(log):
    training, recent, day = _windows(log)
    bad = day.assign(post_duration_ms=12_000.0)
    summary = compute_drift(training, bad, recent=recent, origin=ORIGIN, features=FEATURES)
    assert ("constant", "post_duration_ms") in {(f.rule, f.column) for f in summary.faults}


def test_a_run_on_the_faulted_columns_merged_into_the_clean_day_equals_a_full_run(log):
    training, recent, day = _windows(log)
    kwargs = dict(recent=recent, origin=ORIGIN, features=FEATURES)
    clean = compute_drift(training, day, **kwargs)
    for kind, (feature, _) in EXPECTED.items():
        bad = inject(day, kind, feature, history=log[log["date"] < DAYS[-1]], seed=1)
        cols = list(SURFACE_FEATURES) if feature is None else [feature]
        full = compute_drift(training, bad, **kwargs)
        merged = gate_faulted_day(clean, compute_drift(training, bad, **{**kwargs, "features": cols}))
        assert merged.drift_share == pytest.approx(full.drift_share) and merged.passed == full.passed
        assert sorted(merged.faults, key=str) == sorted(full.faults, key=str)
        assert detected(clean, merged, cols)
    assert not detected(clean, clean, ["post_duration_ms"])


def test_forms_formulas():
    ts = ORIGIN + pd.to_timedelta([12, 36, 60], unit="h")
    frame = pd.DataFrame({"request_ts": ts, "user_impressions": [10.0, 30.0, 50.0], "user_lt_active_days": [0.0, 1.0, 2.0],
                          "req_post_age_hours": [112.0, 136.0, 160.0], "post_impressions_7d": [5.0, 5.0, 5.0]})
    x, used = comparison_form(frame, list(frame.columns[1:]), ORIGIN)
    assert x["user_impressions"].tolist() == pytest.approx([20.0, 20.0, 20.0])  # per day of history
    assert x["user_lt_active_days"].tolist() == pytest.approx([0.0, 1.0, 1.0])  # per earlier whole day
    assert x["req_post_age_hours"].tolist() == pytest.approx([-100.0] * 3)  # created 100 h before the origin
    assert used["post_impressions_7d"] == PER_DAY
    raw, used_raw = comparison_form(frame.drop(columns="request_ts"), ["user_impressions"], ORIGIN)
    assert used_raw == {"user_impressions": RAW} and raw["user_impressions"].tolist() == [10.0, 30.0, 50.0]
    assert history_origin(pd.Timestamp("2022-04-25T01:00:00+08:00")) == pd.Timestamp("2022-04-24T16:00:00Z")


def test_the_table_declares_every_monitored_feature_once():
    assert set(DRIFT_FORMS) == set(monitored_features())
    assert {f for f, d in DRIFT_FORMS.items() if d.critical} == set(SURFACE_FEATURES)
    assert {"user_impressions", "post_impressions_total", "req_post_age_hours"} <= set(growing_features())


def test_the_declared_forms_cover_every_feature_that_grows_on_the_real_log(data_dir):
    """On a real slice (the dev frame: the KuaiRand log, every 20th user), a feature whose daily
    mean rises with the day (Spearman >= 0.9, last over third day >= 1.3) grows by construction:
    it must be transformed or compared against the recent reference, never raw against training."""
    frame = build_dev_frame(data_dir, user_sample_mod=20)
    days = sorted(pd.unique(frame["date"]))[2:]
    means = frame[frame["date"].isin(days)].groupby("date")[list(monitored_features())].mean()
    rank = np.arange(len(days))
    growing = {f for f in means.columns
               if means[f].iloc[0] > 0 and means[f].iloc[-1] / means[f].iloc[0] >= 1.3
               and pd.Series(means[f].to_numpy()).rank().corr(pd.Series(rank), method="spearman") >= 0.9}
    assert {"user_impressions", "post_impressions_total"} <= growing  # the check sees what it must
    uncovered = [f for f in growing if DRIFT_FORMS[f].form == RAW and DRIFT_FORMS[f].against == TRAINING]
    assert uncovered == []


def test_gate_config_from_yaml_rejects_unknown_keys(tmp_path):
    cfg = DriftGateConfig.model_validate(yaml.safe_load("max_drift_share: 0.4\nscale_ratio: 8\n"))
    assert cfg.max_drift_share == 0.4 and cfg.scale_ratio == 8 and cfg.null_share_tolerance == 0.05
    with pytest.raises(ValidationError):
        DriftGateConfig.model_validate({"max_drift_shar": 0.4})
    with pytest.raises(ValidationError):
        DriftGateConfig(scale_ratio=1.0)


def test_faults_survive_the_json_summary_and_the_dashboard_reads_them(log, tmp_path):
    import json

    from monitoring.dashboards.drift_page import summary_from_dict
    from monitoring.drift import write_summary

    training, recent, day = _windows(log)
    bad = inject(day, "dropped", "user_follow_num")
    summary = compute_drift(training, bad, recent=recent, origin=ORIGIN, features=FEATURES)
    back = summary_from_dict(json.loads(write_summary(summary, tmp_path / "s.json").read_text()))
    assert summary.drift_share <= summary.max_drift_share  # one feature of 14: the share alone passes
    assert not back.passed and back.reasons() == summary.reasons() and back.faults[0].rule == "missing"


def test_the_evaluation_counts_false_positives_and_detections(log):
    from monitoring.drift_eval import MIN_HISTORY_DAYS, evaluate_gate

    result = evaluate_gate(log, ORIGIN, fault_days=1, features=("post_duration_ms", "user_impressions"))
    assert [d["date"] for d in result.days] == list(DAYS[MIN_HISTORY_DAYS:])
    assert [d["date"] for d in result.warmup] == list(DAYS[1:MIN_HISTORY_DAYS])
    assert result.false_positive_rate() == 0.0 and result.false_positive_rate(before=True) == 1.0
    kinds = {(f["kind"], f["feature"]) for f in result.faults}
    assert ("stale", "user_impressions") in kinds and ("stale", "post_duration_ms") not in kinds  # static: no stale
    assert len(result.faults) == 1 + 4 + 5 and result.detection_rate() == 1.0
    assert result.detection_rate(before=True) == 0.0  # the share-only gate failed on the clean day already
    table = result.to_table()
    assert "false positives (3 normal days)" in table and "<= 5%" in table and ">= 95%" in table
