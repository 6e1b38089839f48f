"""Drift of features, predictions and labels between a reference and a current window (Evidently).

Per column, Evidently's ``ValueDrift`` with its default choice of test by column type and sample
size (``DataDriftPreset``: for numerical columns the two-sample K-S test up to 1,000 rows and the
normed Wasserstein distance above; chi-square / Jensen-Shannon for categorical ones), or one
method for every column (``method="psi"``: population stability index, threshold 0.1).
A p-value method flags drift when the p-value is below the threshold, a distance when the
distance reaches it (Evidently's convention).

Drift tests compare the distributions of the present values only, so a column that starts to
arrive empty does not move them: each column's null share is also compared, and a change of more
than ``null_share_tolerance`` (absolute) flags the column too, with method ``null share``.

Features are the monitored model inputs (``monitoring.reference.monitored_features``), grouped by
feature view; predictions are the heavy ranker's per-head probabilities (``score_<head>``); when
the current window has labels, each head's label rate, AUC and ECE are reported against the
reference's (label and calibration drift), on the labelled rows only: a production sample's
candidate that was never shown has NaN labels (no label, not a negative).
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import HEADS
from monitoring.reference import feature_view_of, monitored_features, score_column

DEFAULT_MAX_DRIFT_SHARE = 0.3
DEFAULT_NULL_SHARE_TOLERANCE = 0.05
# rows of each side given to the tests (seeded sample): the tests' power saturates long before and
# Evidently's cost grows with it
DEFAULT_MAX_ROWS = 20_000
NO_CURRENT_LABELS = "no labelled rows in the current window"
# A drift run's folder: <state reports>/RUNS_DIR/<UTC time in RUN_TIME_FORMAT>/SUMMARY_FILE (+ report.html);
# written by home_mixer.drift_job, read by the exporter and the drift dashboard.
RUNS_DIR = "drift"
RUN_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class ColumnDrift:
    """One column's drift result.

    Attributes:
        column: column name; view: its feature view (``prediction`` for scores).
        method: the test that decided (Evidently's name, or ``null share``); statistic: its value
            (p-value or distance; for ``null share`` the absolute change); threshold: its threshold.
        drifted: the column drifted (by its distribution or by its null share).
        null_share_reference / null_share_current: share of missing values on each side.
        distribution_method / distribution_statistic / distribution_threshold: the distribution
            test's result even when the null share decided (None when the column had no values).
    """

    column: str
    view: str
    method: str
    statistic: float
    threshold: float
    drifted: bool
    null_share_reference: float
    null_share_current: float
    distribution_method: str | None = None
    distribution_statistic: float | None = None
    distribution_threshold: float | None = None


@dataclass
class DriftSummary:
    """The drift job's result (``to_dict`` is the JSON summary).

    Attributes:
        features / predictions: per-column results.
        drift_share: drifted features / monitored features; max_drift_share: the gate.
        labels: per head ``{"reference_rate", "current_rate", "current_auc", "current_ece",
            "reference_auc", "reference_ece", "reference_labelled_rows", "current_labelled_rows"}``
            when both windows carry label columns, each side computed on its labelled (non-NaN)
            rows; with no labelled current row, ``{"status": NO_CURRENT_LABELS, ...}`` and no
            current metric.
        reference / current: descriptions of the two windows (rows, source).
    """

    features: list[ColumnDrift]
    predictions: list[ColumnDrift]
    drift_share: float
    max_drift_share: float
    labels: dict[str, dict] = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when the share of drifted features is at most ``max_drift_share``."""
        return self.drift_share <= self.max_drift_share

    def drifted_features(self) -> list[ColumnDrift]:
        """Drifted features, strongest first (largest null-share change or smallest p-value /
        largest distance relative to its threshold)."""
        def strength(c: ColumnDrift) -> float:
            if c.method == "null share":
                return 1e6 + c.statistic
            if "p_value" in c.method:
                return -math.log10(max(c.statistic, 1e-300))
            return c.statistic / max(c.threshold, 1e-12)
        return sorted((c for c in self.features if c.drifted), key=strength, reverse=True)

    def by_view(self) -> dict[str, dict[str, int]]:
        """Per feature view: ``{"features": n, "drifted": k}``."""
        out: dict[str, dict[str, int]] = {}
        for c in self.features:
            entry = out.setdefault(c.view, {"features": 0, "drifted": 0})
            entry["features"] += 1
            entry["drifted"] += int(c.drifted)
        return out

    def to_dict(self) -> dict:
        def clean(o):
            if isinstance(o, float) and not math.isfinite(o):
                return None
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, list):
                return [clean(v) for v in o]
            return o

        return clean({
            "passed": self.passed, "drift_share": self.drift_share, "max_drift_share": self.max_drift_share,
            "by_view": self.by_view(), "reference": self.reference, "current": self.current,
            "features": [asdict(c) for c in self.features],
            "predictions": [asdict(c) for c in self.predictions],
            "labels": self.labels,
        })

    def to_text(self, top: int = 10) -> str:
        """A short report: gate, drift share per view, the top drifted features, prediction drift."""
        lines = [f"drift share {self.drift_share:.3f} of {len(self.features)} features "
                 f"(gate {self.max_drift_share:.2f}): {'PASS' if self.passed else 'FAIL'}"]
        for view, e in sorted(self.by_view().items()):
            lines.append(f"  {view:24s} {e['drifted']:3d} / {e['features']:3d} drifted")
        worst = self.drifted_features()[:top]
        if worst:
            lines.append("top drifted features:")
            for c in worst:
                lines.append(f"  {c.column:34s} {c.method:30s} {c.statistic:10.4g} (threshold {c.threshold:g}; "
                             f"nulls {c.null_share_reference:.1%} -> {c.null_share_current:.1%})")
        drifted_heads = [c.column for c in self.predictions if c.drifted]
        lines.append(f"prediction drift: {', '.join(drifted_heads) if drifted_heads else 'none'}")
        if self.labels:
            rows = max(e["current_labelled_rows"] for e in self.labels.values())
            if rows == 0:
                lines.append(f"labels: {NO_CURRENT_LABELS}")
            else:
                ece = ", ".join(f"{h} {e.get('reference_ece', float('nan')):.3f}->{e.get('current_ece', float('nan')):.3f}"
                                for h, e in self.labels.items() if "current_ece" in e)
                lines.append(f"labels: {rows} labelled current rows; ECE reference->current: {ece}")
        return "\n".join(lines)


def _sample(frame: pd.DataFrame, max_rows: int, seed: int) -> pd.DataFrame:
    if len(frame) <= max_rows:
        return frame.reset_index(drop=True)
    return frame.sample(n=max_rows, random_state=seed).reset_index(drop=True)


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    from models.metrics import expected_calibration_error

    return expected_calibration_error(y, p)


def compute_drift(reference: pd.DataFrame, current: pd.DataFrame, *, method: str | None = None,
                  max_drift_share: float = DEFAULT_MAX_DRIFT_SHARE,
                  null_share_tolerance: float = DEFAULT_NULL_SHARE_TOLERANCE, max_rows: int = DEFAULT_MAX_ROWS,
                  heads=HEADS, seed: int = 0, html_path: Path | None = None,
                  reference_info: dict | None = None, current_info: dict | None = None) -> DriftSummary:
    """Compare ``current`` with ``reference`` column by column.

    Args:
        reference / current: frames with the monitored features and ``score_<head>`` columns (and
            optionally the head labels, NaN = unlabelled row); columns absent from either side are
            skipped.
        method: None for Evidently's per-column default, or one stat test for every column
            (e.g. ``"psi"``, ``"ks"``, ``"wasserstein"``; Evidently's names).
        max_drift_share: the gate on the share of drifted features.
        null_share_tolerance: absolute change of a column's null share that counts as drift.
        max_rows: rows per side given to the distribution tests (seeded sample; label metrics use
            every row).
        html_path: write Evidently's HTML report (plots per column) there; without it the same
            per-column tests run without the report (its plots are most of the cost).

    Returns:
        ``DriftSummary``.

    Raises:
        ValueError: an empty side, or no monitored column in common.
    """
    if len(reference) == 0 or len(current) == 0:
        raise ValueError(f"drift needs rows on both sides (reference {len(reference)}, current {len(current)})")
    ref = _sample(reference, max_rows, seed)
    cur = _sample(current, max_rows, seed)
    features = [f for f in monitored_features() if f in ref.columns and f in cur.columns]
    scores = [score_column(h) for h in heads if score_column(h) in ref.columns and score_column(h) in cur.columns]
    columns = features + scores
    if not features:
        raise ValueError("reference and current share no monitored feature column")
    ref_x = ref[columns].apply(pd.to_numeric, errors="coerce").astype("float64")
    cur_x = cur[columns].apply(pd.to_numeric, errors="coerce").astype("float64")
    null_ref, null_cur = ref_x.isna().mean(), cur_x.isna().mean()
    # a column with no values on a side has no distribution: only its null share can speak
    testable = [c for c in columns if ref_x[c].notna().any() and cur_x[c].notna().any()]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # constant or sparse columns make some tests divide by zero; their results stay finite or NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        if html_path is None:
            tests = _stat_tests(ref_x, cur_x, testable, method)
        else:
            tests = _report_tests(ref_x, cur_x, testable, method, Path(html_path))

    def result(col: str, view: str) -> ColumnDrift:
        nr, nc = float(null_ref[col]), float(null_cur[col])
        d_method, d_stat, d_thr = tests.get(col, (None, None, None))
        dist_drift = False
        if d_method is not None and math.isfinite(d_stat):
            dist_drift = d_stat < d_thr if "p_value" in d_method else d_stat >= d_thr
        null_change = abs(nc - nr)
        if null_change > null_share_tolerance:
            return ColumnDrift(col, view, "null share", null_change, null_share_tolerance, True, nr, nc,
                               d_method, d_stat, d_thr)
        if d_method is None:
            return ColumnDrift(col, view, "none (no values)", float("nan"), float("nan"), False, nr, nc)
        return ColumnDrift(col, view, d_method, d_stat, d_thr, dist_drift, nr, nc, d_method, d_stat, d_thr)

    feature_results = [result(c, feature_view_of(c)) for c in features]
    prediction_results = [result(c, "prediction") for c in scores]
    share = sum(c.drifted for c in feature_results) / len(feature_results)
    # label metrics are cheap and labelled rows may be few: all rows, not the tests' sample
    labels = _label_drift(reference, current, heads)
    return DriftSummary(
        features=feature_results, predictions=prediction_results, drift_share=share,
        max_drift_share=max_drift_share, labels=labels,
        reference={"rows": len(reference), "tested_rows": len(ref), **(reference_info or {})},
        current={"rows": len(current), "tested_rows": len(cur), **(current_info or {})},
    )


def _report_tests(ref_x: pd.DataFrame, cur_x: pd.DataFrame, columns: list[str], method: str | None,
                  html_path: Path) -> dict[str, tuple[str, float, float]]:
    """Evidently's report (``DataDriftPreset``): per column ``(method, statistic, threshold)``, and
    its HTML with the plots written to ``html_path``."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    tests: dict[str, tuple[str, float, float]] = {}
    if not columns:
        return tests
    snapshot = Report([DataDriftPreset(columns=columns, method=method)]).run(cur_x[columns], ref_x[columns])
    for m in snapshot.dict()["metrics"]:
        cfg = m.get("config", {})
        if cfg.get("type", "").endswith("ValueDrift"):
            tests[cfg["column"]] = (str(cfg["method"]), float(m["value"]), float(cfg["threshold"]))
    html_path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(html_path))
    return tests


def _stat_tests(ref_x: pd.DataFrame, cur_x: pd.DataFrame, columns: list[str],
                method: str | None) -> dict[str, tuple[str, float, float]]:
    """The same per-column decisions as ``_report_tests`` without building the report.

    A report renders plots for every column (about 0.3 s a column, most of a drift run); without
    an HTML file to write they are wasted. This runs what Evidently's ``ValueDrift`` runs for a
    float64 column (always ``ColumnType.Numerical`` by its inference): infinities and NaN dropped,
    the test chosen by ``get_stattest`` (by method, or by sample size and distinct values), its
    default threshold; the unit tests check both paths agree.
    """
    from evidently.legacy.calculations.stattests import get_stattest
    from evidently.legacy.core import ColumnType
    from evidently.legacy.options.data_drift import DataDriftOptions

    options = DataDriftOptions(all_features_stattest=method)
    kind = ColumnType.Numerical
    tests: dict[str, tuple[str, float, float]] = {}
    for c in columns:
        r = ref_x[c].replace([-np.inf, np.inf], np.nan).dropna()
        k = cur_x[c].replace([-np.inf, np.inf], np.nan).dropna()
        if r.empty or k.empty:
            continue
        test = get_stattest(r, k, kind, options.get_feature_stattest_func(c, kind.value))
        res = test(r, k, kind, options.get_threshold(c, kind.value))
        # the report names a chosen method as given and a default one by the test's display name
        tests[c] = (method if method is not None else test.display_name, float(res.drift_score),
                    float(res.actual_threshold))
    return tests


def _label_drift(ref: pd.DataFrame, cur: pd.DataFrame, heads) -> dict[str, dict]:
    """Per head with a label column on both sides: label rate, and AUC / ECE of the scores
    (calibration), each side on its labelled rows only.

    A NaN label is a candidate that was never shown (a production sample's unlabelled row), not a
    negative: counting it as 0 would bias the rate and the calibration. ``<side>_labelled_rows``
    says how many rows each side's numbers rest on; with none on the current side the head's entry
    has ``status`` = ``NO_CURRENT_LABELS`` and no current metric.
    """
    from models.metrics import auc

    out = {}
    for h in heads:
        if h not in ref.columns or h not in cur.columns:
            continue
        s = score_column(h)
        entry: dict = {}
        for side, frame in (("reference", ref), ("current", cur)):
            y = pd.to_numeric(frame[h], errors="coerce").to_numpy(dtype="float64")
            labelled = np.isfinite(y)
            entry[f"{side}_labelled_rows"] = int(labelled.sum())
            if not labelled.any():
                continue
            entry[f"{side}_rate"] = float(y[labelled].mean())
            if s in frame.columns:
                p = frame[s].to_numpy(dtype="float64")
                ok = labelled & np.isfinite(p)
                entry[f"{side}_auc"] = auc(y[ok], p[ok]) if ok.any() else float("nan")
                entry[f"{side}_ece"] = _ece(y[ok], p[ok]) if ok.any() else float("nan")
        if entry["current_labelled_rows"] == 0:
            entry["status"] = NO_CURRENT_LABELS
        out[h] = entry
    return out


@dataclass(frozen=True)
class FalsePositiveRate:
    """The drift job on windows known to be unshifted: how often it cries wolf.

    Attributes:
        windows: windows compared; passed: how many passed the gate.
        drifted / tested: drifted feature columns over all column tests (the per-column rate).
        by_column: drifted count per column (only columns flagged at least once).
        methods: the distribution tests that decided.
    """

    windows: int
    passed: int
    drifted: int
    tested: int
    by_column: dict[str, int]
    methods: tuple[str, ...]

    @property
    def rate(self) -> float:
        """Per-column false-positive rate: drifted / tested."""
        return self.drifted / self.tested if self.tested else float("nan")

    def worst(self, k: int = 5) -> list[tuple[int, str]]:
        """The ``k`` most often flagged columns as ``(count, column)``, most first."""
        return sorted(((n, c) for c, n in self.by_column.items()), reverse=True)[:k]


def false_positive_rate(reference: pd.DataFrame, windows, *, method: str | None = None,
                        max_drift_share: float = DEFAULT_MAX_DRIFT_SHARE) -> FalsePositiveRate:
    """Run ``compute_drift`` of each unshifted window against ``reference`` and count the flags.

    Every flag on such a window is a false positive; a p-value test at level 0.05 flags ~5 % of
    columns by construction, distances at their thresholds usually fewer.

    Args:
        windows: iterable of frames drawn from the same distribution as ``reference``.
    """
    passed = drifted = tested = n = 0
    by_column: dict[str, int] = {}
    methods: set[str] = set()
    for window in windows:
        summary = compute_drift(reference, window, method=method, max_drift_share=max_drift_share)
        n += 1
        passed += summary.passed
        tested += len(summary.features)
        for c in summary.features:
            drifted += c.drifted
            methods.add(c.distribution_method or c.method)
            if c.drifted:
                by_column[c.column] = by_column.get(c.column, 0) + 1
    return FalsePositiveRate(n, passed, drifted, tested, by_column, tuple(sorted(methods)))


def write_summary(summary: DriftSummary, path: Path) -> Path:
    """Write ``summary.to_dict()`` as JSON (parents created); returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary.to_dict(), indent=2))
    return path
