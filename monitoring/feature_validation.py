"""The validation gate of the feature tables: every table is checked before it is materialised.

A feature table that passes Spark but carries a unit change or a burst of nulls would otherwise go
straight into the online store and to every ranker call. ``validate_feature_tables`` runs one
Great Expectations suites per feature view of ``core.schema.FEATURE_VIEWS`` over its parquet table;
``home_mixer.jobs.materialize`` calls it first, so a failing table stops materialisation and Redis
keeps the values of the last good run. Two batches per table:

- **the whole table** (``table_suite``; it also feeds training sets): the join keys,
  ``event_timestamp`` and every feature exist; keys and timestamps are never null; (join keys,
  ``event_timestamp``) is unique (a tie duplicates rows in Feast's point-in-time join); the row
  count lies in ``[min_row_ratio, max_row_ratio]`` x the last good run's.
- **the online slice** (``online_slice``: the latest row per entity, which is what ``materialize``
  writes to Redis; ``online_suite``). Validating these rows, not the whole history, is what guards
  the online store: a fault in the newest hour is diluted in the full table but is the whole of
  what serving would read. Per feature:
  - **domain** (by name, ``domain_of``): rates in [0, 1]; epoch-second stamps (``*_ts``) in
    [2020-01-01, now]; everything else (counts, durations, days, flags, codes) >= 0;
  - **against the last good run**: the null share at most the previous share +
    ``null_share_tolerance`` (``expect_column_values_to_not_be_null`` with ``mostly``); the
    median within a factor ``scale_ratio`` of the previous one and the maximum at most
    ``scale_ratio`` x the previous maximum (a unit change, ms for us: x 1000, moves both; a log
    that grew by days moves them far less); the entity count within the row-count ratios.

The last good run's profiles (``FeatureTableProfile``) are written after each passing gate to
``<reports>/feature_validation/profile.json``; the first run has none, so only schema and domain
are checked.

The report (``feature_validation.json`` in the reports folder) names the table, the column and
the expectation of every failure; the Great Expectations Data Docs site of every run is published
under ``<reports>/gx/`` (``GateResult.data_docs``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from core.schema import FEATURE_VIEWS, FeatureViewSpec
from monitoring.validation import (
    MIN_EVENT_TIME,
    DataValidationError,
    ExpectationOutcome,
    ExpectationRunner,
    ValidationReport,
)

REPORT_NAME = "feature_validation.json"
PROFILE_DIR = "feature_validation"
PROFILE_NAME = "profile.json"
QUANTILES = (0.5, 0.95)


class FeatureValidationError(DataValidationError):
    """A feature table failed the gate; materialisation did not run. ``report`` has every outcome."""


class FeatureGateConfig(BaseModel):
    """Tolerances of the gate (YAML-loadable with ``FeatureGateConfig.model_validate``).

    Attributes:
        null_share_tolerance: absolute rise of a feature's null share over the last good run that
            still passes (0.05 = 5 points; the drift job's null-share check uses the same default).
        min_row_ratio / max_row_ratio: a table's row count over the last good run's must lie in
            this range (a rebuild over a longer log grows; a shrinking table lost input).
        scale_ratio: factor by which the median may move either way and the maximum may grow
            (10: a unit change of x 1000 fails, a longer log's drift in rates and counts passes).
    """

    model_config = ConfigDict(extra="forbid")

    null_share_tolerance: float = Field(0.05, ge=0.0, le=1.0)
    min_row_ratio: float = Field(0.8, gt=0.0, le=1.0)
    max_row_ratio: float = Field(2.0, ge=1.0)
    scale_ratio: float = Field(10.0, gt=1.0)


def domain_of(feature: str) -> str:
    """The value domain the gate checks for a feature, by name.

    Returns:
        ``"rate"`` (in [0, 1]) for names containing ``_rate``; ``"epoch_s"`` for names ending in
        ``_ts`` (epoch seconds from 2020-01-01 to now); ``"non_negative"`` otherwise.
    """
    if "_rate" in feature:
        return "rate"
    if feature.endswith("_ts"):
        return "epoch_s"
    return "non_negative"


@dataclass(frozen=True)
class ColumnProfile:
    """One feature of a good run: null share, quantiles ``QUANTILES`` and max of the present values
    (None when the column had no values)."""

    null_share: float
    quantiles: tuple[float, ...] | None
    max: float | None


@dataclass(frozen=True)
class FeatureTableProfile:
    """A table of the last good run: its row count, its online slice's row count and a
    ``ColumnProfile`` per feature of the online slice."""

    rows: int
    online_rows: int
    columns: dict[str, ColumnProfile]

    @classmethod
    def of(cls, frame: pd.DataFrame, online: pd.DataFrame, spec: FeatureViewSpec) -> "FeatureTableProfile":
        """Profile a feature table (``frame``) and its online slice (``online``) over ``spec``'s features."""
        cols: dict[str, ColumnProfile] = {}
        for f in spec.features:
            if f not in online.columns:
                continue
            values = pd.to_numeric(online[f], errors="coerce").astype("float64")
            present = values.dropna()
            null_share = float(values.isna().mean()) if len(values) else 0.0
            if present.empty:
                cols[f] = ColumnProfile(null_share, None, None)
            else:
                cols[f] = ColumnProfile(null_share, tuple(float(q) for q in present.quantile(list(QUANTILES))),
                                        float(present.max()))
        return cls(rows=len(frame), online_rows=len(online), columns=cols)

    def to_dict(self) -> dict:
        return {"rows": self.rows, "online_rows": self.online_rows, "columns": {k: {"null_share": c.null_share, "quantiles": c.quantiles, "max": c.max}
                                               for k, c in self.columns.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureTableProfile":
        return cls(rows=int(d["rows"]), online_rows=int(d["online_rows"]), columns={
            k: ColumnProfile(float(c["null_share"]), tuple(c["quantiles"]) if c.get("quantiles") else None, c.get("max"))
            for k, c in d["columns"].items()})


def _band(value: float, ratio: float) -> tuple[float, float]:
    """[value / ratio, value * ratio] (ordered for negative values)."""
    lo, hi = value / ratio, value * ratio
    return (min(lo, hi), max(lo, hi))


def online_slice(frame: pd.DataFrame, spec: FeatureViewSpec, until: pd.Timestamp | None = None) -> pd.DataFrame:
    """The rows ``materialize`` writes to the online store: per entity (``spec.join_keys``), the
    latest row by ``event_timestamp`` at or before ``until`` (None: no bound). Rows with a null key
    or stamp are left out (``table_suite`` reports them)."""
    keys = list(spec.join_keys)
    stamps = pd.to_datetime(frame["event_timestamp"], utc=True)
    ok = frame[keys].notna().all(axis=1).to_numpy() & stamps.notna().to_numpy()
    if until is not None:
        ok &= (stamps <= until).to_numpy()
    kept = np.flatnonzero(ok)
    # positions by time (stable: a tie keeps file order), then the last per key; only the keys are
    # copied until the one final take (each pandas step on the wide table copied all of it)
    order = kept[np.argsort(stamps.to_numpy(dtype="datetime64[ns]")[kept], kind="stable")]
    latest = ~frame[keys].take(order).duplicated(keys, keep="last").to_numpy()
    return frame.take(order[latest]).reset_index(drop=True)


def _row_count(previous: int, config: FeatureGateConfig):
    import great_expectations.expectations as gxe

    return gxe.ExpectTableRowCountToBeBetween(min_value=math.floor(previous * config.min_row_ratio),
                                              max_value=math.ceil(previous * config.max_row_ratio))


def table_suite(spec: FeatureViewSpec, previous: FeatureTableProfile | None, config: FeatureGateConfig) -> list:
    """The whole table's expectations: columns exist, keys and stamps non-null, (keys, stamp)
    unique, and the row count against ``previous`` (the last good run; None: not checked)."""
    import great_expectations.expectations as gxe

    keys = [*spec.join_keys, "event_timestamp"]
    out: list = [gxe.ExpectColumnToExist(column=c) for c in (*keys, *spec.features)]
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in keys]
    out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=keys))
    if previous is not None:
        out.append(_row_count(previous.rows, config))
    return out


def online_suite(spec: FeatureViewSpec, previous: FeatureTableProfile | None, config: FeatureGateConfig,
                 now: pd.Timestamp) -> list:
    """The online slice's expectations per feature: its domain, and against ``previous`` (None:
    domain only) its null share, median and maximum, plus the slice's row count.

    Args:
        now: upper bound of epoch-second stamps.
    """
    import great_expectations.expectations as gxe

    out: list = []
    now_s = int(now.timestamp())
    for f in spec.features:
        domain = domain_of(f)
        if domain == "rate":
            out.append(gxe.ExpectColumnValuesToBeBetween(column=f, min_value=0.0, max_value=1.0))
        elif domain == "epoch_s":
            out.append(gxe.ExpectColumnValuesToBeBetween(column=f, min_value=int(MIN_EVENT_TIME.timestamp()),
                                                         max_value=now_s))
        else:
            out.append(gxe.ExpectColumnValuesToBeBetween(column=f, min_value=0))
    if previous is None:
        return out
    out.append(_row_count(previous.online_rows, config))
    for f, prof in previous.columns.items():
        if f not in spec.features:
            continue
        allowed_nulls = prof.null_share + config.null_share_tolerance
        if allowed_nulls < 1.0:
            out.append(gxe.ExpectColumnValuesToNotBeNull(column=f, mostly=round(1.0 - allowed_nulls, 6)))
        if prof.quantiles is None or domain_of(f) == "epoch_s":  # stamps move with the log, not by scale
            continue
        # the median, not GX's quantile expectation: its pandas result does not serialise to the
        # Data Docs store (numpy bools)
        median = prof.quantiles[0]
        if median != 0:
            lo, hi = _band(median, config.scale_ratio)
            out.append(gxe.ExpectColumnMedianToBeBetween(column=f, min_value=lo, max_value=hi))
        if prof.max and prof.max > 0:
            out.append(gxe.ExpectColumnMaxToBeBetween(column=f, max_value=prof.max * config.scale_ratio))
    return out


def profile_path(reports: Path) -> Path:
    """Where the last good run's profiles are kept."""
    return Path(reports) / PROFILE_DIR / PROFILE_NAME


def load_profiles(reports: Path) -> dict[str, FeatureTableProfile]:
    """The last good run's profile per table (empty before the first good run)."""
    try:
        data = json.loads(profile_path(reports).read_text())
    except FileNotFoundError:
        return {}
    return {t: FeatureTableProfile.from_dict(d) for t, d in data.get("tables", {}).items()}


def save_profiles(reports: Path, profiles: dict[str, FeatureTableProfile]) -> Path:
    """Write the profiles of a run that passed the gate (they become the next run's baseline)."""
    path = profile_path(reports)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"tables": {t: p.to_dict() for t, p in profiles.items()}}, indent=1))
    return path


@dataclass
class GateResult:
    """A gate run that passed: the report, the profiles it recorded and the Data Docs index."""

    report: ValidationReport
    profiles: dict[str, FeatureTableProfile]
    data_docs: Path | None
    report_path: Path | None


def _read_table(path: Path, spec: FeatureViewSpec) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"feature table {spec.table} is missing ({path}); run `home-mixer features build`")
    return pd.read_parquet(path)


def validate_feature_tables(tables_dir: Path, reports: Path | None, *, views: tuple[FeatureViewSpec, ...] = FEATURE_VIEWS,
                            config: FeatureGateConfig | None = None, now: pd.Timestamp | None = None,
                            baseline: dict[str, FeatureTableProfile] | None = None,
                            record: bool = True, until: pd.Timestamp | None = None) -> GateResult:
    """Validate every feature table before materialisation; stop on any failure.

    Args:
        tables_dir: folder of the feature tables (``<state>/tables``: ``<view.table>.parquet``).
        reports: reports folder (normally ``StateDir.reports``): the JSON report, the Data Docs
            and the last good profiles live there. None: in memory only, no baseline.
        views: the feature views whose tables are checked.
        baseline: profiles to compare with (default: the last good run's from ``reports``).
        record: on success, save this run's profiles as the next baseline.
        until: the end of the materialisation window (the online slice is the latest row per
            entity at or before it; None: the latest row).

    Returns:
        ``GateResult`` (every expectation passed).

    Raises:
        FeatureValidationError: an expectation failed; the message names table, column,
            expectation, bad rows and examples of each failure. Nothing is recorded, so the next
            run still compares with the last good one.
        FileNotFoundError: a feature table is missing.
    """
    config = config or FeatureGateConfig()
    now = now if now is not None else pd.Timestamp.now(tz="UTC")
    previous = baseline if baseline is not None else (load_profiles(reports) if reports is not None else {})
    runner = ExpectationRunner(reports)
    outcomes: list[ExpectationOutcome] = []
    rows: dict[str, int] = {}
    profiles: dict[str, FeatureTableProfile] = {}
    for spec in views:
        frame = _read_table(Path(tables_dir) / f"{spec.table}.parquet", spec)
        online = online_slice(frame, spec, until)
        rows[spec.table] = len(frame)
        rows[f"{spec.table} (online slice)"] = len(online)
        profiles[spec.table] = FeatureTableProfile.of(frame, online, spec)
        last = previous.get(spec.table)
        outcomes += runner.run(f"feature_table_{spec.table}", table_suite(spec, last, config), frame, spec.table)
        outcomes += runner.run(f"feature_table_{spec.table}_online", online_suite(spec, last, config, now),
                               online, f"{spec.table} (online slice)")
    report = ValidationReport(rows=rows, outcomes=tuple(outcomes))
    report_path = report.write_json(Path(reports) / REPORT_NAME) if reports is not None else None
    docs = runner.docs_index()
    report.raise_for_failures(
        report_path, subject="feature tables", consequence="materialisation stopped and the online store keeps "
        "the values of the last good run",
        advice="Fix the feature job (or its input) and rebuild; to accept a real change, rerun with a wider "
               "gate config." + (f" Data Docs: {docs}." if docs else ""),
        error=FeatureValidationError)
    if record and reports is not None:
        save_profiles(reports, profiles)
    return GateResult(report=report, profiles=profiles, data_docs=docs, report_path=report_path)


def inject_fault(frame: pd.DataFrame, unit_column: str, null_column: str, null_share: float = 0.2,
                 factor: float = 1000.0, seed: int = 0) -> pd.DataFrame:
    """A copy of ``frame`` with a realistic fault: ``unit_column`` x ``factor`` (a unit change) and
    ``null_share`` of ``null_column`` set to NaN (rows drawn with ``seed``).

    Raises:
        KeyError: a named column is missing.
    """
    missing = [c for c in (unit_column, null_column) if c not in frame.columns]
    if missing:
        raise KeyError(f"cannot inject the fault: column(s) {missing} not in the frame")
    out = frame.copy()
    out[unit_column] = out[unit_column] * factor
    rng = np.random.default_rng(seed)
    out.loc[rng.random(len(out)) < null_share, null_column] = np.nan
    return out
