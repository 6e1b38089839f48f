"""Great Expectations suites for the raw KuaiRand-Pure files; wrong data stops the batch job.

Three suites, one per file: the impression log, users and videos. ``validate_raw`` runs them in an
ephemeral (in-memory) Great Expectations 1.x context over pandas frames, returns a report, writes it
as JSON into the state folder's ``reports/`` and raises ``DataValidationError`` on any failure, with
a message naming the file, the column, the failed expectation, the number of bad rows and examples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import RAW_LABEL_COLUMNS
from pipelines.raw import LOG_DTYPES, USERS_DTYPES, VIDEOS_DTYPES, RawData

# Earliest plausible event time; KuaiRand was collected in 2022. Later than "now" is a clock or
# unit error (seconds vs milliseconds shows up as 1970).
MIN_EVENT_TIME = pd.Timestamp("2020-01-01", tz="UTC")
# KuaiRand's date/hourmin are China time (UTC+8) with hourmin rounded up to the hour, so events in
# a day's last hour carry the next date. Measured on the 2022-04-25..05-04 log: 170,132 rows have
# the UTC+8 day of time_ms, 1,539 the day after, none anything else.
LOCAL_UTC_OFFSET = pd.Timedelta(hours=8)
DATE_LAG_COLUMN = "date_minus_local_day_of_time_ms"
DATE_LAG_DAYS = (0, 1)
REPORT_NAME = "raw_validation.json"
_EXAMPLES = 5


class DataValidationError(ValueError):
    """Raw data failed its expectation suite. ``report`` holds the full ``ValidationReport``."""

    def __init__(self, message: str, report: "ValidationReport") -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one expectation on one file.

    Attributes:
        file: file name the frame came from.
        column: the column checked (None for table-level expectations).
        expectation: Great Expectations type, e.g. ``expect_column_values_to_be_in_set``.
        kwargs: the expectation's arguments (value sets, bounds), JSON-able.
        success: whether it passed.
        unexpected_count: number of rows that failed (None where not row-based).
        examples: up to 5 failing values.
        observed: the observed value of aggregate checks (e.g. the dtype).
        error: exception message if the expectation could not be evaluated.
    """

    file: str
    column: str | None
    expectation: str
    kwargs: dict
    success: bool
    unexpected_count: int | None = None
    examples: list = field(default_factory=list)
    observed: object = None
    error: str | None = None

    def describe(self) -> str:
        """One line: file, column, expectation, bad rows and examples."""
        where = f"{self.file} column '{self.column}'" if self.column else self.file
        args = {k: v for k, v in self.kwargs.items() if k not in ("column", "batch_id")}
        text = f"{where}: {self.expectation}({args}) failed"
        if self.unexpected_count is not None:
            text += f": {self.unexpected_count} bad rows"
            if any(e is not None for e in self.examples):  # the examples of a null check say nothing
                text += f", e.g. {self.examples}"
        elif self.observed is not None:
            text += f": observed {self.observed!r}"
        if self.error:
            text += f": {self.error}"
        return text


@dataclass(frozen=True)
class ValidationReport:
    """All expectation outcomes of one validation run, plus row counts per file."""

    rows: dict[str, int]
    outcomes: tuple[ExpectationOutcome, ...]

    @property
    def success(self) -> bool:
        return all(o.success for o in self.outcomes)

    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict:
        """JSON-able dict: success, rows per file, counts, and every outcome."""
        return {
            "success": self.success,
            "rows": self.rows,
            "expectations": len(self.outcomes),
            "failed": len(self.failures()),
            "outcomes": [_jsonable(asdict(o)) for o in self.outcomes],
        }

    def write_json(self, path: Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` (parents created); returns ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def raise_for_failures(self, report_path: Path | None = None, *, subject: str = "raw data",
                           consequence: str = "the job stops",
                           advice: str = "Fix the input file (or its loader) and run again.",
                           error: type["DataValidationError"] | None = None) -> None:
        """Raise ``error`` (default ``DataValidationError``) listing every failed expectation, if any
        failed: ``"<subject> failed k of n expectations; <consequence>:"``, one line per failure,
        then ``advice`` and where the full report is."""
        failed = self.failures()
        if not failed:
            return
        lines = [f"{subject} failed {len(failed)} of {len(self.outcomes)} expectations; {consequence}:"]
        lines += [f"  - {o.describe()}" for o in failed]
        lines.append(advice + (f" Full report: {report_path}" if report_path else ""))
        raise (error or DataValidationError)("\n".join(lines), self)


# ---- suites: each returns (expectation, column) pairs for a frame with the given columns ----

def _exists_and_typed(dtypes: dict[str, str]) -> list:
    import great_expectations.expectations as gxe

    out: list = []
    for col, dtype in dtypes.items():
        out.append(gxe.ExpectColumnToExist(column=col))
        if dtype in ("int64", "float64"):
            out.append(gxe.ExpectColumnValuesToBeOfType(column=col, type_=dtype))
    return out


def log_suite(now: pd.Timestamp) -> list:
    """Expectations of the impression log.

    Every column of ``LOG_DTYPES`` exists with its dtype; label columns are in {0, 1}; ``user_id``,
    ``video_id``, ``time_ms`` are non-null; ``time_ms`` (epoch ms) is in [2020-01-01, now];
    ``date`` is a yyyymmdd day equal to the UTC+8 day of ``time_ms`` or the next day (checked on the
    derived column ``date_minus_local_day_of_time_ms``, null when ``date`` is not a valid day).
    """
    import great_expectations.expectations as gxe

    out = _exists_and_typed(LOG_DTYPES)
    out += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "video_id", "time_ms")]
    out += [gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[0, 1]) for c in RAW_LABEL_COLUMNS]
    out.append(gxe.ExpectColumnValuesToBeBetween(
        column="time_ms", min_value=int(MIN_EVENT_TIME.value // 1_000_000),
        max_value=int(now.value // 1_000_000)))
    out.append(gxe.ExpectColumnValuesToNotBeNull(column=DATE_LAG_COLUMN))
    out.append(gxe.ExpectColumnValuesToBeBetween(
        column=DATE_LAG_COLUMN, min_value=DATE_LAG_DAYS[0], max_value=DATE_LAG_DAYS[1]))
    return out


def users_suite(now: pd.Timestamp) -> list:
    """Expectations of the user features: typed columns, ``user_id`` non-null and unique, counts >= 0."""
    import great_expectations.expectations as gxe

    out = _exists_and_typed(USERS_DTYPES)
    out += [gxe.ExpectColumnValuesToNotBeNull(column="user_id"),
            gxe.ExpectColumnValuesToBeUnique(column="user_id")]
    out += [gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0)
            for c in ("follow_user_num", "fans_user_num", "friend_user_num", "register_days")]
    return out


def videos_suite(now: pd.Timestamp) -> list:
    """Expectations of the video features.

    Typed columns; ``video_id`` non-null and unique; ``author_id`` non-null; ``video_duration`` >= 0
    (missing allowed); ``upload_dt`` formatted ``%Y-%m-%d`` (missing allowed).
    """
    import great_expectations.expectations as gxe

    out = _exists_and_typed(VIDEOS_DTYPES)
    out += [gxe.ExpectColumnValuesToNotBeNull(column="video_id"),
            gxe.ExpectColumnValuesToBeUnique(column="video_id"),
            gxe.ExpectColumnValuesToNotBeNull(column="author_id"),
            gxe.ExpectColumnValuesToBeBetween(column="video_duration", min_value=0),
            gxe.ExpectColumnValuesToMatchStrftimeFormat(column="upload_dt", strftime_format="%Y-%m-%d")]
    return out


SUITES: dict[str, Callable[[pd.Timestamp], list]] = {
    "log": log_suite, "users": users_suite, "videos": videos_suite,
}


def with_derived_checks(kind: str, frame: pd.DataFrame) -> pd.DataFrame:
    """The frame the suite of ``kind`` sees: the log gains ``date_minus_local_day_of_time_ms``.

    That column is ``date`` (yyyymmdd) minus the UTC+8 calendar day of ``time_ms``, in days
    (float64; NaN when ``date`` is not a valid yyyymmdd day).
    """
    if kind != "log" or not {"date", "time_ms"} <= set(frame.columns):
        return frame
    day = pd.to_datetime(frame["date"].astype("string"), format="%Y%m%d", errors="coerce")
    ms = pd.to_numeric(frame["time_ms"], errors="coerce")
    local_day = (pd.to_datetime(ms, unit="ms", errors="coerce") + LOCAL_UTC_OFFSET).dt.normalize()
    out = frame.copy()
    out[DATE_LAG_COLUMN] = ((day - local_day) / pd.Timedelta(days=1)).astype("float64")
    return out


class ExpectationRunner:
    """Runs expectation suites over pandas frames in one Great Expectations context.

    Without ``docs_root`` the context is ephemeral (in memory: no files, no analytics). With it, the
    context is a File Data Context under ``docs_root / "gx"``: every suite is stored and run as a
    ``ValidationDefinition`` (which keeps its result in the context's validation results store),
    and :meth:`docs_index` builds the Data Docs site once (HTML: each suite and every validation
    run, failures included) at ``docs_root / "gx/uncommitted/data_docs/local_site/index.html"``.

    Suites are replaced (delete + add), not ``add_or_update``d: GX's update matches each new
    expectation against the stored ones with ``list.index`` (quadratic in pydantic ``__eq__``
    calls), and a checkpoint's ``UpdateDataDocsAction`` rebuilds the whole site after every suite.
    Together they were 19 of the feature gate's 39 s on the demo's tables.
    """

    def __init__(self, docs_root: Path | None = None) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        if docs_root is None:
            from great_expectations.data_context.types.base import DataContextConfig, InMemoryStoreBackendDefaults

            config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(),
                                       analytics_enabled=False, progress_bars=ProgressBarsConfig(globally=False))
            self._context = gx.get_context(mode="ephemeral", project_config=config)
        else:
            Path(docs_root).mkdir(parents=True, exist_ok=True)
            self._context = gx.get_context(mode="file", project_root_dir=str(docs_root))
            self._context.variables.progress_bars = ProgressBarsConfig(globally=False)
            self._context.variables.analytics_enabled = False
        self._docs = docs_root is not None
        self._docs_pending: list = []  # suites and results stored since the site was last built
        self._source = self._context.data_sources.add_or_update_pandas("home_mixer")

    def docs_index(self) -> Path | None:
        """Build the Data Docs site if suites ran since it was last built; its ``index.html``
        (None for an ephemeral context)."""
        if not self._docs:
            return None
        if self._docs_pending:
            # only the new pages and the index: a full build re-renders every stored run, and
            # the state's store keeps all of them
            self._context.build_data_docs(resource_identifiers=self._docs_pending)
            self._docs_pending = []
        url = self._context.get_docs_sites_urls()[0]["site_url"]
        return Path(url.removeprefix("file://"))

    def _page_ids(self, suite_name: str, result) -> list:
        """The Data Docs resources of one stored run: its suite and its validation result (the ids
        ``ValidationDefinition.run`` stores the result under)."""
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier, ValidationResultIdentifier)

        suite_id = ExpectationSuiteIdentifier(name=suite_name)
        return [suite_id, ValidationResultIdentifier(expectation_suite_identifier=suite_id,
                                                     run_id=result.meta["run_id"],
                                                     batch_identifier=result.batch_id)]

    def _replace(self, store, item):
        """``store.add(item)`` after deleting a stored item of the same name (see the class doc)."""
        try:
            store.delete(item.name)
        except Exception:  # GX raises a different error per store for a missing name
            pass
        return store.add(item)

    def run(self, suite_name: str, expectations: list, frame: pd.DataFrame, file_name: str) -> list[ExpectationOutcome]:
        """Run ``expectations`` on ``frame`` as suite ``suite_name``; one outcome per expectation.

        Expectations on columns the frame lacks are skipped: their ``expect_column_to_exist``
        failure already names the column. ``file_name`` names the frame in the outcomes.
        """
        gx = self._gx
        kept = [e for e in expectations
                if type(e).__name__ == "ExpectColumnToExist" or getattr(e, "column", None) in (None, *frame.columns)]
        try:
            asset = self._source.get_asset(suite_name)
        except LookupError:
            asset = self._source.add_dataframe_asset(suite_name)
        try:
            batch_definition = asset.get_batch_definition("whole")
        except KeyError:
            batch_definition = asset.add_batch_definition_whole_dataframe("whole")
        result_format = {"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES}
        if not self._docs:
            suite = gx.ExpectationSuite(name=suite_name, expectations=kept)
            result = batch_definition.get_batch(batch_parameters={"dataframe": frame}).validate(
                suite, result_format=result_format)
            return [_outcome(file_name, r) for r in result.results]
        suite = self._replace(self._context.suites, gx.ExpectationSuite(name=suite_name, expectations=kept))
        definition = self._replace(self._context.validation_definitions,
                                   gx.ValidationDefinition(data=batch_definition, suite=suite, name=suite_name))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        self._docs_pending += self._page_ids(suite_name, result)
        return [_outcome(file_name, r) for r in result.results]


class RawValidator:
    """The raw-file suites of ``SUITES`` on an ``ExpectationRunner`` (ephemeral unless ``docs_root``)."""

    def __init__(self, docs_root: Path | None = None) -> None:
        self.runner = ExpectationRunner(docs_root)

    def validate(self, kind: str, frame: pd.DataFrame, file_name: str,
                 now: pd.Timestamp | None = None) -> list[ExpectationOutcome]:
        """Run the suite of ``kind`` ("log", "users", "videos") on ``frame``; one outcome per expectation.

        Raises:
            ValueError: unknown ``kind``.
        """
        if kind not in SUITES:
            raise ValueError(f"unknown suite {kind!r}; expected one of {sorted(SUITES)}")
        now = now if now is not None else pd.Timestamp.now(tz="UTC")
        return self.runner.run(f"raw_{kind}", SUITES[kind](now), with_derived_checks(kind, frame), file_name)


def _outcome(file_name: str, r) -> ExpectationOutcome:
    cfg = r.expectation_config
    res = dict(r.result or {})
    info = r.exception_info or {}
    error = info.get("exception_message") if isinstance(info, dict) else None
    if error is None and isinstance(info, dict):  # keyed by metric when several metrics failed
        msgs = [v.get("exception_message") for v in info.values() if isinstance(v, dict)]
        error = next((m for m in msgs if m), None)
    return ExpectationOutcome(
        file=file_name,
        column=cfg.kwargs.get("column"),
        expectation=cfg.type,
        kwargs=_jsonable({k: v for k, v in cfg.kwargs.items() if k != "batch_id"}),
        success=bool(r.success),
        unexpected_count=res.get("unexpected_count"),
        examples=_jsonable(list(res.get("partial_unexpected_list", []))[:_EXAMPLES]),
        observed=_jsonable(res.get("observed_value")),
        error=error,
    )


def _jsonable(value):
    """Plain Python values for JSON: numpy scalars -> int/float, NaN -> None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def validate_raw(raw: RawData, report_dir: Path | None = None,
                 now: pd.Timestamp | None = None, docs_root: Path | None = None) -> ValidationReport:
    """Validate the raw log, users and videos; stop on any failure.

    Args:
        raw: frames from ``pipelines.raw.load_raw``.
        report_dir: if given (normally ``StateDir.reports``), the report is written there as
            ``raw_validation.json``, also when validation fails, so the failure can be inspected.
        now: upper bound for ``time_ms`` (default: the current time).
        docs_root: publish Great Expectations Data Docs under this folder (``ExpectationRunner``);
            None validates in memory only.

    Returns:
        The ``ValidationReport`` (all expectations passed).

    Raises:
        DataValidationError: any expectation failed; the message lists file, column, expectation,
            number of bad rows and example values for each failure.
    """
    validator = RawValidator(docs_root)
    outcomes: list[ExpectationOutcome] = []
    rows: dict[str, int] = {}
    for kind, frame, name in (("log", raw.log, raw.log_name), ("users", raw.users, raw.users_path.name),
                              ("videos", raw.videos, raw.videos_path.name)):
        rows[name] = len(frame)
        outcomes += validator.validate(kind, frame, name, now=now)
    report = ValidationReport(rows=rows, outcomes=tuple(outcomes))
    report_path = report.write_json(Path(report_dir) / REPORT_NAME) if report_dir is not None else None
    validator.runner.docs_index()  # the Data Docs site, failures included, before raising
    report.raise_for_failures(report_path)
    return report
