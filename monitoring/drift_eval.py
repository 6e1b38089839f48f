"""How good the drift gate is: false positives on real days, detection of injected faults.

Over consecutive days of a served-feature log (a training set: features as serving had them, with
``request_ts``, ``date`` and entity ids), each day is compared as the drift job would compare it:
against the training reference (a sample of every earlier day: a champion trained on the days
before) and the recent reference (the ``recent_days`` days before). A normal day that fails the
gate is a false positive. Then faults are injected into copies of those days, one feature at a
time (``FAULT_KINDS``), and each faulted day is gated again; one that passes is a missed fault.

For speed a faulted day is re-tested on the faulted columns only and merged into the day's clean
result (every other column's result is the clean one by construction: the tests are per column);
``gate_faulted_day`` does the merge, and the unit tests check it agrees with a full run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from core.schema import SURFACE_FEATURES
from monitoring.drift import DriftGateConfig, DriftSummary, compute_drift, entity_keys
from monitoring.drift_forms import CALENDAR, RECENT, drift_form, history_origin
from monitoring.reference import monitored_features

# fault kinds: scale x 10, a unit change (ms -> s: / 1000), a share of values nulled, the feature
# frozen at an older day's values (the entity's last value before ``STALE_DAYS`` days ago), the
# surface mix changed (``CATEGORY_SHARE`` of rows moved to surface 0), the feature dropped (all NaN)
FAULT_KINDS = ("scale", "unit", "nulls", "stale", "category", "dropped")
SCALE_FACTOR = 10.0
UNIT_FACTOR = 1e-3
NULL_SHARE = 0.2
STALE_DAYS = 3
CATEGORY_SHARE = 0.3
CATEGORY_TARGET = "req_surface_0"
# features faulted, across views and forms (training / recent reference; raw, per day, per whole
# day, creation time; dense and sparse)
FAULT_FEATURES = (
    "post_duration_ms", "user_follow_num", "user_click_rate", "user_impressions", "post_impressions_24h",
    "post_impressions_total", "author_click_rate_total", "ua_engagement_rate", "tmp_impressions_24h",
    "user_lt_click_rate", "user_lt_active_days", "ut_click_rate", "req_post_age_hours", "hist_coeng_sum",
)
# a normal day counts once its training reference has this many days (a champion trained on two
# days of log is not one a deployment serves; a stale fault needs STALE_DAYS earlier days)
MIN_HISTORY_DAYS = STALE_DAYS
# the targets of issue 22
MAX_FALSE_POSITIVE_RATE = 0.05
MIN_DETECTION_RATE = 0.95


def stale_applies(feature: str) -> bool:
    """A feature a stopped table can freeze: it has an entity and changes with the log (declared
    against the recent reference); a static attribute frozen is not a fault."""
    return entity_keys(feature) is not None and drift_form(feature).against == RECENT


def inject(day: pd.DataFrame, kind: str, feature: str | None = None, history: pd.DataFrame | None = None,
           seed: int = 0) -> pd.DataFrame:
    """A copy of ``day`` with one fault.

    Args:
        day: a window of served-feature rows (float features, ``request_ts``, entity ids).
        kind: one of ``FAULT_KINDS``. feature: the faulted column (ignored for ``category``, which
            rewrites the surface one-hots ``core.schema.SURFACE_FEATURES``).
        history: for ``stale``, earlier rows (``request_ts`` and the feature's entity keys): each
            row takes its entity's last value before ``STALE_DAYS`` days before the window's first
            request, NaN for an entity not seen by then (a frozen table has no row for it).

    Raises:
        ValueError: an unknown kind, ``stale`` without history or for a feature with no entity.
        KeyError: the feature is not a column of ``day``.
    """
    out = day.copy()
    rng = np.random.default_rng(seed)
    if kind == "category":
        moved = rng.random(len(out)) < CATEGORY_SHARE
        for s in SURFACE_FEATURES:
            if s in out.columns:
                out.loc[moved, s] = 1.0 if s == CATEGORY_TARGET else 0.0
        return out
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; one of {FAULT_KINDS}")
    if feature not in out.columns:
        raise KeyError(f"{feature!r} is not a column of the window")
    values = pd.to_numeric(out[feature], errors="coerce").astype("float64")
    if kind == "scale":
        out[feature] = values * SCALE_FACTOR
    elif kind == "unit":
        out[feature] = values * UNIT_FACTOR
    elif kind == "nulls":
        out[feature] = values.mask(rng.random(len(out)) < NULL_SHARE)
    elif kind == "dropped":
        out[feature] = np.nan
    elif kind == "stale":
        keys = entity_keys(feature)
        if keys is None or history is None:
            raise ValueError(f"a stale {feature!r} needs an entity and earlier rows")
        cutoff = pd.to_datetime(day["request_ts"], utc=True).min().floor("D") - pd.Timedelta(days=STALE_DAYS - 1)
        old = history[pd.to_datetime(history["request_ts"], utc=True) < cutoff].sort_values("request_ts")
        last = old.groupby(list(keys))[feature].last()
        index = pd.MultiIndex.from_frame(out[list(keys)]) if len(keys) > 1 else pd.Index(out[keys[0]])
        out[feature] = last.reindex(index).to_numpy(dtype="float64")
    return out


def gate_faulted_day(clean: DriftSummary, partial: DriftSummary) -> DriftSummary:
    """``clean`` with the columns and faults of ``partial`` (a run on the faulted columns only)
    put in place of its own; the drift share recomputed over every tested feature."""
    mine = {c.column for c in partial.features}
    features = [next(p for p in partial.features if p.column == c.column) if c.column in mine else c
                for c in clean.features]
    tested = [c for c in features if c.form != CALENDAR]
    share = sum(c.drifted for c in tested) / max(len(tested), 1)
    faults = [f for f in clean.faults if f.column not in mine] + list(partial.faults)
    return replace(clean, features=features, drift_share=share, faults=faults)


def detected(clean: DriftSummary, faulted: DriftSummary, columns) -> bool:
    """The gate caught a fault in ``columns``: a fault names one of them, or the share rule fails
    where the clean day's passed (a day that failed anyway does not count as a detection)."""
    if any(f.column in columns for f in faulted.faults):
        return True
    return faulted.drift_share > faulted.max_drift_share >= clean.drift_share


@dataclass
class GateEvaluation:
    """The gate over days and faults.

    Attributes:
        days: per normal day ``{"date", "rows", "before_share", "before_passed", "share", "passed",
            "reasons"}`` (before = raw features against the training reference, share rule only:
            the gate as it was).
        faults: per injected fault ``{"date", "kind", "feature", "detected", "reasons",
            "before_detected"}`` (before: the share rule fails where the clean day's passed; a day
            that failed anyway tells nothing about the fault).
        warmup: the days before ``first_day`` (references of fewer days), gated the same way but
            not counted in the rates.
        seconds: wall time.
    """

    days: list[dict] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    warmup: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def false_positive_rate(self, before: bool = False) -> float:
        """Failed normal days / normal days."""
        key = "before_passed" if before else "passed"
        return sum(not d[key] for d in self.days) / len(self.days) if self.days else float("nan")

    def detection_rate(self, before: bool = False, kind: str | None = None) -> float:
        """Detected faults / injected faults (of one kind)."""
        key = "before_detected" if before else "detected"
        rows = [f for f in self.faults if (kind is None or f["kind"] == kind) and key in f]
        return sum(f[key] for f in rows) / len(rows) if rows else float("nan")

    def to_table(self) -> str:
        """The rates against the targets, per fault kind, and the normal days."""
        def pct(x: float, width: int) -> str:
            return f"{x:{width}.1%}" if x == x else f"{'-':>{width}s}"  # NaN: not measured

        fp, fp0 = self.false_positive_rate(), self.false_positive_rate(before=True)
        det, det0 = self.detection_rate(), self.detection_rate(before=True)
        lines = [f"{'':34s} {'gate before':>12s} {'gate now':>10s} {'target':>8s}",
                 f"{f'false positives ({len(self.days)} normal days)':34s} {pct(fp0, 12)} {pct(fp, 10)} "
                 f"{'<= ' + format(MAX_FALSE_POSITIVE_RATE, '.0%'):>8s}",
                 f"{f'faults detected ({len(self.faults)} injected)':34s} {pct(det0, 12)} {pct(det, 10)} "
                 f"{'>= ' + format(MIN_DETECTION_RATE, '.0%'):>8s}"]
        for kind in FAULT_KINDS:
            rows = [f for f in self.faults if f["kind"] == kind]
            if rows:
                lines.append(f"{f'  {kind} ({len(rows)})':34s} {pct(self.detection_rate(True, kind), 12)} "
                             f"{pct(self.detection_rate(False, kind), 10)}")
        lines.append("normal days: date, drift share before -> now, gate now (reasons)")
        for d in self.warmup + self.days:
            tag = " (warm-up, not counted)" if d in self.warmup else ""
            lines.append(f"  {d['date']}  {d['before_share']:.2f} -> {d['share']:.2f}  "
                         f"{'PASS' if d['passed'] else 'FAIL: ' + '; '.join(d['reasons'])}{tag}")
        missed = [f for f in self.faults if not f["detected"]]
        if missed:
            lines.append("missed faults: " + ", ".join(f"{f['date']} {f['kind']} {f['feature']}" for f in missed[:20]))
        lines.append(f"({self.seconds:.0f} s)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-ready: the rates (now and before), the targets, detection per kind, every day and
        fault (NaN where a rate was not measured)."""
        return {"false_positive_rate": self.false_positive_rate(), "detection_rate": self.detection_rate(),
                "before": {"false_positive_rate": self.false_positive_rate(True),
                           "detection_rate": self.detection_rate(True)},
                "targets": {"max_false_positive_rate": MAX_FALSE_POSITIVE_RATE,
                            "min_detection_rate": MIN_DETECTION_RATE},
                "by_kind": {k: self.detection_rate(kind=k) for k in FAULT_KINDS},
                "days": self.days, "warmup": self.warmup, "faults": self.faults, "seconds": self.seconds}


def evaluate_gate(rows: pd.DataFrame, origin: pd.Timestamp | None = None, gate: DriftGateConfig | None = None,
                  first_day: int = MIN_HISTORY_DAYS, fault_days: int | None = None, features=FAULT_FEATURES,
                  kinds=FAULT_KINDS, max_rows: int = 20_000, last_days: int | None = None,
                  before_faults: bool = True, seed: int = 0, log=None) -> GateEvaluation:
    """False positives and detection of the gate over the days of ``rows``.

    Args:
        rows: served-feature rows of consecutive days: the monitored features (float, NaN =
            missing), ``date`` (yyyymmdd), ``request_ts`` (UTC) and entity ids.
        origin: where the features start counting (default: ``history_origin`` of the first
            request).
        first_day: index of the first counted day: it needs that many earlier days (a training
            reference of at least ``MIN_HISTORY_DAYS`` days, and the stale fault's horizon). Days
            1..first_day - 1 are gated too and reported as warm-up.
        fault_days: inject faults on the last ``fault_days`` evaluated days only (default all that
            have ``STALE_DAYS`` earlier days).
        features / kinds: what to inject (``category`` is one fault per day).
        last_days: gate only the last ``last_days`` counted days (no warm-up days; e.g. the demo's
            validation days), None for all.
        before_faults: also gate each faulted day as the gate was (half the cost of the faults).
        seed: of the training reference's sample, the tests' row samples and the injected faults.
        log: a callable taking one line of progress, or None.

    Returns:
        ``GateEvaluation``.

    Raises:
        ValueError: fewer than ``first_day + 1`` days.
    """
    t0 = time.perf_counter()
    gate = gate or DriftGateConfig()
    days = sorted(int(d) for d in pd.unique(rows["date"]))
    if len(days) <= first_day:
        raise ValueError(f"{len(days)} days: the gate's evaluation needs more than {first_day}")
    if origin is None:
        origin = history_origin(pd.to_datetime(rows["request_ts"], utc=True).min())
    out = GateEvaluation()
    feature_columns = set(monitored_features())
    evaluated = days[first_day:]
    faulted = [d for d in evaluated if days.index(d) >= STALE_DAYS]
    if fault_days is not None:
        faulted = faulted[-fault_days:]
    for d in days[1:] if last_days is None else evaluated[-last_days:]:
        i = days.index(d)
        warmup = d not in evaluated
        cur = rows[rows["date"] == d]
        earlier = rows[rows["date"] < d]
        training = earlier.sample(n=min(max_rows, len(earlier)), random_state=seed)
        recent = rows[rows["date"].isin(days[max(0, i - gate.recent_days):i])]
        before = compute_drift(training, cur, gate=gate, max_rows=max_rows, seed=seed)
        kwargs = dict(recent=recent, origin=origin, gate=gate, max_rows=max_rows, seed=seed)
        clean = compute_drift(training, cur, **kwargs)
        (out.warmup if warmup else out.days).append({"date": d, "rows": int(len(cur)), "before_share": before.drift_share,
                         "before_passed": before.drift_share <= before.max_drift_share,
                         "share": clean.drift_share, "passed": clean.passed, "reasons": clean.reasons()})
        if log:
            log(f"{d}{' (warm-up, not counted)' if warmup else ''}: drift share {before.drift_share:.2f} -> {clean.drift_share:.2f}, "
                f"{'PASS' if clean.passed else 'FAIL ' + '; '.join(clean.reasons())}")
        if d not in faulted:
            continue
        plan = [("category", None)] if "category" in kinds else []
        for f in features:
            if f not in cur.columns:
                continue
            plan += [(k, f) for k in kinds if k not in ("category", "stale") or (k == "stale" and stale_applies(f))]
        for kind, f in plan:
            cols = list(SURFACE_FEATURES) if kind == "category" else [f]
            # the faulted columns and what the forms and the stale rule read: the rest is the clean day's
            keep = [c for c in rows.columns if c in cols or c not in feature_columns]
            bad = inject(cur[keep], kind, f, history=earlier, seed=d + seed)
            merged = gate_faulted_day(clean, compute_drift(training[keep], bad, features=cols,
                                                           **{**kwargs, "recent": recent[keep]}))
            entry = {"date": d, "kind": kind, "feature": f or "surface mix",
                     "detected": detected(clean, merged, cols), "reasons": merged.reasons()}
            if before_faults:
                old = gate_faulted_day(before, compute_drift(training[keep], bad, features=cols, gate=gate,
                                                             max_rows=max_rows, seed=seed))
                entry["before_detected"] = old.drift_share > old.max_drift_share >= before.drift_share
            out.faults.append(entry)
    out.seconds = time.perf_counter() - t0
    return out
