"""monitoring.drift / monitoring.reference: Evidently drift per column, null shares, the gate."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from monitoring.drift import (
    DEFAULT_MAX_DRIFT_SHARE, NO_CURRENT_LABELS, SHARE_RULE, compute_drift, false_positive_rate, write_summary,
)
from monitoring.drift_forms import CALENDAR
from monitoring.reference import (
    DEFAULT_SAMPLE_ROWS, build_reference, feature_view_of, monitored_features, score_column,
)
from tests.dev_frame import build_dev_frame


def _window(n: int, seed: int, features: list[str] | None = None) -> pd.DataFrame:
    """Rows of the monitored features (default: all; independent, realistic shapes), scores and labels."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({f: rng.gamma(2.0, 1.0, n) for f in (features or monitored_features())})
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
    # without a report to write, the same tests run without rendering it: the same decisions
    assert compute_drift(ref, cur).to_dict()["features"] == summary.to_dict()["features"]


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
        shifted[f] = shifted[f] * 1.5 + 1  # a broad shift, below the scale rule's factor
    summary = compute_drift(ref, shifted, max_drift_share=0.3)
    tested = [c for c in summary.features if c.form != CALENDAR]  # day of week is not tested
    assert len(tested) == len(features) - 1
    assert summary.drift_share == pytest.approx(sum(c.drifted for c in tested) / len(tested))
    assert summary.drift_share >= 0.45 and not summary.passed
    assert not summary.faults and summary.reasons()[0].startswith(f"{SHARE_RULE}: ")
    loose = compute_drift(ref, shifted, max_drift_share=0.9)
    assert loose.passed and loose.reasons() == []


def test_prediction_and_label_drift_are_reported(windows):
    ref, cur = windows
    cur = cur.copy()
    cur[score_column("click")] = np.clip(cur[score_column("click")] + 0.3, 0, 1)  # overconfident scores
    summary = compute_drift(ref, cur)
    assert [c.column for c in summary.predictions if c.drifted] == [score_column("click")]
    click = summary.labels["click"]
    assert click["current_ece"] > click["reference_ece"] + 0.2
    assert click["current_rate"] == pytest.approx(cur["click"].mean())


def test_label_drift_uses_labelled_rows_only(windows):
    ref, cur = windows
    cur = cur.copy()
    # a production sample: most candidates were never shown, so they have no label (NaN), and
    # the never-shown ones would all look like negatives if NaN were read as 0
    shown = np.random.default_rng(3).random(len(cur)) < 0.3
    for h in HEADS:
        cur[h] = cur[h].astype("float64").where(shown)
    summary = compute_drift(ref, cur)
    click = summary.labels["click"]
    assert click["current_labelled_rows"] == shown.sum() and click["reference_labelled_rows"] == len(ref)
    kept = cur[shown]
    expected = compute_drift(ref, kept).labels["click"]
    for key in ("current_rate", "current_auc", "current_ece"):
        assert click[key] == pytest.approx(expected[key])
    assert click["current_rate"] == pytest.approx(kept["click"].mean())
    assert "status" not in click and "labelled current rows" in summary.to_text()

    for h in HEADS:
        cur[h] = np.nan  # labels not joined yet
    nothing = compute_drift(ref, cur).labels["click"]
    assert nothing["status"] == NO_CURRENT_LABELS and nothing["current_labelled_rows"] == 0
    assert not {"current_rate", "current_auc", "current_ece"} & set(nothing)
    assert "reference_ece" in nothing
    assert f"labels: {NO_CURRENT_LABELS}" in compute_drift(ref, cur).to_text()


def test_psi_for_every_column_and_a_json_summary_without_nan(windows, tmp_path):
    ref, cur = windows
    bad = cur.copy()
    bad["post_duration_ms"] *= 1000
    bad["user_impressions"] = np.nan  # no values at all: only the null share can speak
    summary = compute_drift(ref, bad, method="psi")
    methods = {c.method for c in summary.features if c.column not in ("user_impressions",) and c.form != CALENDAR}
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


# --- false positives over unshifted draws, on real-ish served rows --------------------------------

# the tests' nominal level: K-S (Evidently's default up to 1,000 reference rows) flags at p < 0.05,
# so ~5 % of unshifted columns drift by construction; the normed Wasserstein distance (0.1,
# above 1,000 rows) and PSI (0.1) are distance thresholds with no level, far above the sampling
# noise of dense columns at these sizes. Their false positives come from the nearly empty columns
# (``ua_*``: 99 % null, ~20 values in a 2,000-row draw), where two small samples are far apart by
# chance. The bound allows twice the nominal level: columns of one draw are correlated, so 20 draws
# measure the rate coarsely.
NOMINAL_LEVEL = 0.05
MAX_FALSE_POSITIVE_RATE = 2 * NOMINAL_LEVEL
DRAWS = 20


@pytest.fixture(scope="module")
def served_rows(data_dir):
    """Monitored features of real impressions (the dev frame: KuaiRand log, every 4th user, ~42k
    rows), shuffled so any two disjoint slices are draws of the same distribution."""
    frame = build_dev_frame(data_dir, user_sample_mod=4)[list(monitored_features())]
    return frame.sample(frac=1.0, random_state=0).reset_index(drop=True)


def _unshifted_draws(rows: pd.DataFrame, reference_rows: int, current_rows: int):
    """A reference of ``reference_rows`` and ``DRAWS`` independent current windows of
    ``current_rows`` from the rows the reference did not take."""
    reference, pool = rows.iloc[:reference_rows], rows.iloc[DEFAULT_SAMPLE_ROWS:]
    assert len(pool) >= 5 * current_rows
    draws = [pool.iloc[np.random.default_rng(100 + k).choice(len(pool), current_rows, replace=False)]
             for k in range(DRAWS)]
    return reference, draws


@pytest.mark.parametrize("reference_rows, current_rows, method", [
    (DEFAULT_SAMPLE_ROWS, 2000, None),  # as served: the champion's 20k-row reference, Wasserstein / JS
    (1000, 1000, None),  # K-S at p < 0.05: the nominal level applies
    (DEFAULT_SAMPLE_ROWS, 2000, "psi"),
])
def test_false_positive_rate_over_unshifted_draws(served_rows, reference_rows, current_rows, method):
    reference, draws = _unshifted_draws(served_rows, reference_rows, current_rows)
    fp = false_positive_rate(reference, draws, method=method, max_drift_share=DEFAULT_MAX_DRIFT_SHARE)
    passed, rate, drifted, tested, worst = fp.passed, fp.rate, fp.drifted, fp.tested, fp.worst()
    assert fp.windows == DRAWS
    print(f"\n{method or 'default'} ({reference_rows} reference / {current_rows} current rows): gate passed "
          f"{passed}/{DRAWS}; per-column false-positive rate {rate:.4f} ({drifted}/{tested}) = "
          f"{rate / NOMINAL_LEVEL:.2f}x the nominal {NOMINAL_LEVEL}; most flagged: {worst}")
    assert passed >= DRAWS - 1
    assert rate <= MAX_FALSE_POSITIVE_RATE


@pytest.mark.parametrize("method", [None, "psi"])
def test_a_synthetic_shift_is_flagged_on_exactly_its_columns(served_rows, method):
    reference, draws = _unshifted_draws(served_rows, DEFAULT_SAMPLE_ROWS, 2000)
    # a draw none of whose columns drifts unshifted, so every flag below is the shift's
    cur = next(d for d in draws if not compute_drift(reference, d, method=method).drifted_features())
    bad = cur.copy()
    bad["post_duration_ms"] *= 1000  # ms -> us upstream
    bad.loc[np.random.default_rng(1).random(len(bad)) < 0.2, "post_click_rate_24h"] = np.nan
    bad["user_register_days"] += 0.5 * reference["user_register_days"].std()  # a mean shift of 0.5 sd
    summary = compute_drift(reference, bad, method=method)
    flagged = {c.column: c.method for c in summary.drifted_features()}
    assert set(flagged) == {"post_duration_ms", "post_click_rate_24h", "user_register_days"}
    assert flagged["post_click_rate_24h"] == "null share" and flagged["user_register_days"] != "null share"
    # 3 of 90 features do not move the share; the unit change and the new nulls are critical faults,
    # the mean shift is not
    assert summary.drift_share <= summary.max_drift_share and not summary.passed
    assert {(f.rule, f.column) for f in summary.faults} == {("scale", "post_duration_ms"),
                                                            ("nulls", "post_click_rate_24h")}
