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

Features that grow by construction are compared in the form, and against the reference,
``monitoring.drift_forms.DRIFT_FORMS`` declares: the training reference, or a rolling ``recent``
one (the previous day(s) of served rows). The gate (``DriftGateConfig``) fails on (a) the share of
drifted features passing ``max_drift_share``, or (b) any critical fault of a single feature, each
named in ``DriftSummary.faults``: ``missing`` (a feature that had values arrives empty), ``nulls``
(its null share rises by more than ``null_share_tolerance``, or it loses more than
``present_loss_tolerance`` of its present values), ``constant`` (one value where the
reference had many), ``scale`` (the mean absolute value moves by ``scale_ratio`` or more either way:
a unit change), ``stale`` (the share of entities seen in two or more hours whose value never
changes jumps against the recent reference: a feature table that stopped updating) and
``category mix`` (a critical feature, the surface mix, drifted). Distribution tests stay
Evidently's; the fault rules are plain counts over the same frames.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from core.schema import FEATURE_VIEWS, HEADS
from monitoring.drift_forms import CALENDAR, CREATION_TIME, RAW, RECENT, comparison_form, drift_form
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
# the gate's rules, as named in DriftSummary.faults and reasons()
SHARE_RULE = "drift share"
FAULT_RULES = ("missing", "nulls", "constant", "scale", "stale", "category mix")


class DriftGateConfig(BaseModel):
    """The drift gate's thresholds (YAML-loadable with ``DriftGateConfig.model_validate``; the CLI's
    ``monitor drift --gate-config``).

    Attributes:
        max_drift_share: the gate on drifted / tested features (rule a).
        null_share_tolerance: absolute change of a column's null share that counts as drift, and
            the rise that is a ``nulls`` fault (a fall, fewer cold users, is not a fault).
        scale_ratio: factor of the mean absolute value (in the compared form), either way, that is
            a ``scale`` fault (x 10 or a unit change fails; day-to-day moves of KuaiRand's features
            stay under 3).
        constant_mode_share: a ``constant`` fault needs the reference's most common value below this
            share (a nearly constant feature may come out constant by chance).
        stale_jump: rise of the share of unchanged entities (seen in >= 2 request hours, one value)
            against the recent reference that is a ``stale`` fault.
        present_loss_tolerance: share of a feature's present values lost (null share rise over the
            reference's present share) that is a ``nulls`` fault too: a sparse feature present in
            3 % of rows that loses a third of them moves its null share by 1 point only. (The
            sparsest KuaiRand features, ``ua_*`` in ~500 of 20,000 rows, move their present share
            by up to 17 % from one real day to the next, so a smaller loss is not a fault.)
        category_shift: absolute move of a critical one-hot feature's share (the surface mix) that,
            with its drift test flagging, is a ``category mix`` fault.
        min_rows: fewest present values on each side for the scale / constant rules.
        min_entities: fewest entities seen in >= 2 hours on each side for the stale rule.
        recent_days: days before the window that make the rolling reference (``home-mixer monitor
            drift`` over dates).
    """

    model_config = ConfigDict(extra="forbid")

    max_drift_share: float = Field(DEFAULT_MAX_DRIFT_SHARE, ge=0.0, le=1.0)
    null_share_tolerance: float = Field(DEFAULT_NULL_SHARE_TOLERANCE, ge=0.0, le=1.0)
    scale_ratio: float = Field(5.0, gt=1.0)
    constant_mode_share: float = Field(0.99, gt=0.0, le=1.0)
    stale_jump: float = Field(0.5, gt=0.0, le=1.0)
    category_shift: float = Field(0.05, gt=0.0, le=1.0)
    present_loss_tolerance: float = Field(0.3, gt=0.0, le=1.0)
    min_rows: int = Field(50, ge=1)
    min_entities: int = Field(30, ge=1)
    recent_days: int = Field(1, ge=1)


@dataclass(frozen=True)
class GateFault:
    """A critical fault of one feature: fails the gate whatever the drift share.

    Attributes:
        rule: one of ``FAULT_RULES``. column: the feature. value / threshold: the rule's measure
        and its limit (see ``DriftGateConfig``). detail: one readable line.
    """

    rule: str
    column: str
    value: float
    threshold: float
    detail: str


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
    against: str = "training"
    form: str = RAW


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
        reference / current: descriptions of the two windows (rows, source); ``reference["recent"]``
            describes the rolling reference when there was one.
        faults: critical single-feature faults (``GateFault``); any fails the gate.
    """

    features: list[ColumnDrift]
    predictions: list[ColumnDrift]
    drift_share: float
    max_drift_share: float
    labels: dict[str, dict] = field(default_factory=dict)
    reference: dict = field(default_factory=dict)
    current: dict = field(default_factory=dict)
    faults: list[GateFault] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """True when the share of drifted features is at most ``max_drift_share`` and no feature
        has a critical fault."""
        return self.drift_share <= self.max_drift_share and not self.faults

    def reasons(self) -> list[str]:
        """Why the gate failed, one line a reason (empty when it passed): the drift share rule, then
        each fault as ``"<rule>: <column> (<detail>)"``."""
        out = []
        if self.drift_share > self.max_drift_share:
            out.append(f"{SHARE_RULE}: {self.drift_share:.3f} > {self.max_drift_share:.2f}")
        out += [f"{f.rule}: {f.column} ({f.detail})" for f in self.faults]
        return out

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
        """The JSON summary: gate (``passed``, ``reasons``, ``faults``), share, per-view counts, every
        column's result, labels; non-finite numbers as None."""
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
            "faults": [asdict(f) for f in self.faults], "reasons": self.reasons(),
        })

    def to_text(self, top: int = 10) -> str:
        """A short report: gate, drift share per view, the top drifted features, prediction drift."""
        lines = [f"drift share {self.drift_share:.3f} of {len(self.features)} features "
                 f"(gate {self.max_drift_share:.2f}): {'PASS' if self.passed else 'FAIL'}"]
        lines += [f"  gate: {r}" for r in self.reasons()]
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


def compute_drift(reference: pd.DataFrame, current: pd.DataFrame, *, recent: pd.DataFrame | None = None,
                  origin: pd.Timestamp | None = None, gate: DriftGateConfig | None = None,
                  method: str | None = None, max_drift_share: float | None = None,
                  null_share_tolerance: float | None = None, max_rows: int = DEFAULT_MAX_ROWS,
                  heads=HEADS, seed: int = 0, html_path: Path | None = None, features=None,
                  reference_info: dict | None = None, current_info: dict | None = None,
                  recent_info: dict | None = None) -> DriftSummary:
    """Compare ``current`` with its references column by column, and apply the gate.

    Args:
        reference: the training reference (the champion's sample, or a window of the training
            set): monitored features, ``score_<head>`` columns, optionally head labels (NaN =
            unlabelled row). Columns absent from either side are skipped.
        current: the window under test, the same columns; with a request time (``request_ts`` or
            ``as_of``) and entity ids (``user_id``, ``post_id``, ...) the transformed forms and the
            stale rule apply.
        recent: the rolling reference (the previous day(s) of served rows, same columns): features
            declared ``RECENT`` in ``monitoring.drift_forms.DRIFT_FORMS`` are compared with it. None:
            every feature against ``reference`` (and no stale rule).
        origin: ``drift_forms.history_origin`` of the log the features accumulate from; None keeps
            every feature raw. A form is applied only when both sides of a comparison can take it.
        gate: thresholds (``DriftGateConfig()`` by default); ``max_drift_share`` /
            ``null_share_tolerance`` override its fields when given.
        method: None for Evidently's per-column default, or one stat test for every column
            (e.g. ``"psi"``, ``"ks"``, ``"wasserstein"``; Evidently's names).
        max_rows: rows per side given to the distribution tests (seeded sample; label metrics use
            every row).
        html_path: write Evidently's HTML report (plots per column) there; without it the same
            per-column tests run without the report (its plots are most of the cost).
        features: test only these monitored features (default: all present on both sides).

    Returns:
        ``DriftSummary`` (``passed`` is the gate: share at most ``max_drift_share`` and no fault).

    Raises:
        ValueError: an empty side, or no monitored column in common.
    """
    gate = gate or DriftGateConfig()
    overrides = {k: v for k, v in (("max_drift_share", max_drift_share),
                                   ("null_share_tolerance", null_share_tolerance)) if v is not None}
    gate = gate.model_copy(update=overrides) if overrides else gate
    if len(reference) == 0 or len(current) == 0:
        raise ValueError(f"drift needs rows on both sides (reference {len(reference)}, current {len(current)})")
    ref = _sample(reference, max_rows, seed)
    cur = _sample(current, max_rows, seed)
    rec = _sample(recent, max_rows, seed) if recent is not None and len(recent) else None
    wanted = monitored_features() if features is None else tuple(features)
    names = [f for f in wanted if f in ref.columns and f in cur.columns]
    scores = [score_column(h) for h in heads if score_column(h) in ref.columns and score_column(h) in cur.columns]
    if not names:
        raise ValueError("reference and current share no monitored feature column")
    against = {f: RECENT if rec is not None and f in rec.columns and drift_form(f).against == RECENT
               else "training" for f in names}
    cur_x, cur_used = comparison_form(cur, names + scores, origin)
    ref_x, ref_used = comparison_form(ref, names + scores, origin)
    raw_cur = cur[names + scores].apply(pd.to_numeric, errors="coerce").astype("float64")
    raw_ref = ref[names + scores].apply(pd.to_numeric, errors="coerce").astype("float64")
    rec_x, rec_used = comparison_form(rec, [f for f in names if against[f] == RECENT], origin) if rec is not None \
        else (None, {})
    # each column's two sides: its reference in the same form as the current window (raw when
    # either side lacks what the form needs)
    def raw_base(c: str) -> pd.Series:
        return pd.to_numeric(rec[c], errors="coerce").astype("float64") if against.get(c) == RECENT else raw_ref[c]

    sides: dict[str, tuple[pd.Series, pd.Series, str]] = {}
    for c in names + scores:
        base_x, base_used = (rec_x, rec_used) if against.get(c) == RECENT else (ref_x, ref_used)
        if base_used.get(c, RAW) == cur_used[c]:
            sides[c] = (base_x[c], cur_x[c], cur_used[c])
        else:
            sides[c] = (raw_base(c), raw_cur[c], RAW)
    # one reference frame for Evidently: columns of either reference side by side, padded with NaN
    # (its tests drop missing values column by column; null shares are computed before padding)
    ref_frame = pd.concat({c: b.reset_index(drop=True) for c, (b, _, _) in sides.items()}, axis=1)
    cur_frame = pd.concat({c: k.reset_index(drop=True) for c, (_, k, _) in sides.items()}, axis=1)
    null_ref = {c: float(b.isna().mean()) for c, (b, _, _) in sides.items()}
    null_cur = {c: float(k.isna().mean()) for c, (_, k, _) in sides.items()}
    # a column with no values on a side has no distribution: only its null share can speak
    testable = [c for c, (b, k, form) in sides.items() if form != CALENDAR and b.notna().any() and k.notna().any()]
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        # constant or sparse columns make some tests divide by zero; their results stay finite or NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        if html_path is None:
            tests = _stat_tests(ref_frame, cur_frame, testable, method)
        else:
            tests = _report_tests(ref_frame, cur_frame, testable, method, Path(html_path))

    def result(col: str, view: str) -> ColumnDrift:
        nr, nc = null_ref[col], null_cur[col]
        where, form = against.get(col, "training"), sides[col][2]
        d_method, d_stat, d_thr = tests.get(col, (None, None, None))
        dist_drift = False
        if d_method is not None and math.isfinite(d_stat):
            dist_drift = d_stat < d_thr if "p_value" in d_method else d_stat >= d_thr
        null_change = abs(nc - nr)
        if null_change > gate.null_share_tolerance:
            return ColumnDrift(col, view, "null share", null_change, gate.null_share_tolerance, True, nr, nc,
                               d_method, d_stat, d_thr, where, form)
        if d_method is None:
            what = "none (calendar)" if form == CALENDAR else "none (no values)"
            return ColumnDrift(col, view, what, float("nan"), float("nan"), False, nr, nc, against=where, form=form)
        return ColumnDrift(col, view, d_method, d_stat, d_thr, dist_drift, nr, nc, d_method, d_stat, d_thr,
                           where, form)

    feature_results = [result(c, feature_view_of(c)) for c in names]
    prediction_results = [result(c, "prediction") for c in scores]
    tested = [c for c in feature_results if c.form != CALENDAR]
    share = sum(c.drifted for c in tested) / max(len(tested), 1)
    raws = {c: (raw_base(c).dropna(), raw_cur[c].dropna()) for c in names if sides[c][2] == CREATION_TIME}
    faults = _faults(feature_results, sides, raws, gate)
    if rec is not None:
        faults += _stale_faults(rec, cur, [c for c in names if against[c] == RECENT], gate)
    # label metrics are cheap and labelled rows may be few: all rows, not the tests' sample
    labels = _label_drift(reference, current, heads)
    reference_out = {"rows": len(reference), "tested_rows": len(ref), **(reference_info or {})}
    if rec is not None:
        reference_out["recent"] = {"rows": len(recent), "tested_rows": len(rec), **(recent_info or {})}
    return DriftSummary(
        features=feature_results, predictions=prediction_results, drift_share=share,
        max_drift_share=gate.max_drift_share, labels=labels, reference=reference_out,
        current={"rows": len(current), "tested_rows": len(cur), **(current_info or {})}, faults=faults,
    )


def _faults(results: list[ColumnDrift], sides: dict[str, tuple[pd.Series, pd.Series, str]],
            raws: dict[str, tuple[pd.Series, pd.Series]], gate: DriftGateConfig) -> list[GateFault]:
    """The single-feature rules ``missing``, ``nulls``, ``constant``, ``scale`` and ``category mix``
    (``DriftGateConfig``), on each feature's compared form against its own reference (``raws``:
    the raw present values of both sides, for the scale of an offset form)."""
    faults = []
    for c in results:
        base, now, form = sides[c.column]
        b, k = base.dropna(), now.dropna()
        nr, nc = c.null_share_reference, c.null_share_current
        if nc >= 1.0 and nr < 1.0:
            faults.append(GateFault("missing", c.column, nc, 1.0, f"every value missing, {nr:.1%} in the reference"))
            continue
        # a sparse feature (present in a few % of rows) loses few points of null share when part of
        # its values go missing: the loss relative to its present share speaks for it
        loss = (nc - nr) / (1.0 - nr) if nr < 1.0 else 0.0
        if nc - nr > gate.null_share_tolerance or (loss > gate.present_loss_tolerance and len(b) >= gate.min_rows):
            faults.append(GateFault("nulls", c.column, nc - nr, gate.null_share_tolerance,
                                    f"null share {nr:.1%} -> {nc:.1%} ({loss:.0%} of the present values lost)"))
        if form == CALENDAR or len(b) < gate.min_rows or len(k) < gate.min_rows:
            continue
        mode_share = float(b.value_counts(normalize=True).iloc[0])
        if k.nunique() == 1 and b.nunique() > 1 and mode_share < gate.constant_mode_share:
            faults.append(GateFault("constant", c.column, 1.0, gate.constant_mode_share,
                                    f"one value {k.iloc[0]:g} (the reference's most common value has "
                                    f"{mode_share:.0%} of rows)"))
        # an offset form (creation time) hides a unit change of the age it was made from: raw values
        sb, sk = (raws[c.column] if form == CREATION_TIME else (b, k))
        scale_b, scale_k = float(sb.abs().mean()), float(sk.abs().mean())
        if scale_b > 0 and scale_k > 0:
            ratio = scale_k / scale_b
            if max(ratio, 1 / ratio) >= gate.scale_ratio:
                faults.append(GateFault("scale", c.column, ratio, gate.scale_ratio,
                                        f"mean |value| x {ratio:.3g} ({form if form != CREATION_TIME else RAW} form)"))
        if c.drifted and c.method != "null share" and drift_form(c.column).critical and len(b) and len(k):
            # a p-value test flags 5 % of unshifted columns: the mix must also move by a share that matters
            moved = abs(float(k.mean()) - float(b.mean()))
            if moved >= gate.category_shift:
                faults.append(GateFault("category mix", c.column, moved, gate.category_shift,
                                        f"share {b.mean():.1%} -> {k.mean():.1%}; {c.method} {c.statistic:.3g} "
                                        f"(threshold {c.threshold:g})"))
    return faults


def entity_keys(feature: str) -> tuple[str, ...] | None:
    """The join keys of ``feature``'s feature view; None for request and history features (no
    entity)."""
    for view in FEATURE_VIEWS:
        if feature in view.features:
            return view.join_keys
    return None


def unchanged_share(frame: pd.DataFrame, feature: str, keys, hours: np.ndarray | None = None) -> tuple[float, int]:
    """Among entities (``keys``) with present values in two or more request hours of ``frame``,
    the share whose value never changes; and how many such entities there are.

    A feature served from a table that stopped updating keeps each entity's value for the whole
    window, while a live one changes between hours (counts grow, rates move). ``hours``:
    ``drift_forms.request_hours(frame)`` (computed when not given); (nan, 0) without a request
    time or the keys.
    """
    from monitoring.drift_forms import request_hours

    hours = request_hours(frame) if hours is None else hours
    if hours is None or any(k not in frame.columns for k in keys) or feature not in frame.columns:
        return float("nan"), 0
    values = pd.to_numeric(frame[feature], errors="coerce")
    ok = values.notna().to_numpy()
    if not ok.any():
        return float("nan"), 0
    g = pd.DataFrame({**{k: frame[k].to_numpy()[ok] for k in keys}, "v": values.to_numpy()[ok],
                      "h": hours[ok]}).groupby(list(keys))
    per = pd.DataFrame({"hours": g["h"].nunique(), "values": g["v"].nunique()})
    per = per[per["hours"] >= 2]
    if per.empty:
        return float("nan"), 0
    return float((per["values"] == 1).mean()), int(len(per))


def _stale_faults(recent: pd.DataFrame, current: pd.DataFrame, features, gate: DriftGateConfig) -> list[GateFault]:
    """The ``stale`` rule: a feature's unchanged-entity share (``unchanged_share``) rises by
    ``stale_jump`` or more against the recent reference, with ``min_entities`` on each side."""
    from monitoring.drift_forms import request_hours

    faults = []
    hours_before, hours_now = request_hours(recent), request_hours(current)
    for f in features:
        keys = entity_keys(f)
        if keys is None:
            continue
        before, n_before = unchanged_share(recent, f, keys, hours_before)
        now, n_now = unchanged_share(current, f, keys, hours_now)
        if n_before >= gate.min_entities and n_now >= gate.min_entities and now - before >= gate.stale_jump:
            faults.append(GateFault("stale", f, now - before, gate.stale_jump,
                                    f"{now:.0%} of {n_now} entities seen in >= 2 hours never change "
                                    f"({before:.0%} in the recent reference)"))
    return faults


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
