"""``home-mixer monitor drift``: a window of served rows against the champion's training reference.

Windows are served-feature rows (``pipelines.training_set``: features as the online store had
them) scored by the champion heavy ranker:

- the mixer's production sample (``--window 1h`` / ``24h`` / ``<n>h`` / ``<n>m``: the last hours or
  minutes of ``core.online_layout.DRIFT_SAMPLE``), scored as served (its scores are kept) and
  labelled from the state's impressions table when it exists (label and calibration drift);
- the state's training set, restricted to dates ``FROM..TO`` (default: the validation days);
- any impression log of the KuaiRand schema (``--log PATH``), featurised through the same code as
  evaluation (``home_mixer.evaluation.featurize_log``);
- the reference is the champion's own (``monitoring.reference``, logged when it was trained), or
  another window of the training set (``--against FROM..TO``), e.g. to compare two days.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.online_store import connect
from core.schema import CHAMPION_ALIAS, HEADS, HEAVY_RANKER_NAME, VALIDATION_DAYS
from core.state import StateDir
from monitoring.dashboards.drift_page import write_drift_dashboard
from monitoring.drift import (
    RUN_TIME_FORMAT, RUNS_DIR, SUMMARY_FILE, DriftGateConfig, DriftSummary, compute_drift, write_summary,
)
from monitoring.drift_forms import history_origin
from monitoring.reference import build_reference, load_reference, log_reference, score_column



def parse_dates(spec: str) -> tuple[int, int]:
    """``"YYYYMMDD..YYYYMMDD"`` (or one date) -> ``(from, to)`` inclusive.

    Raises:
        ValueError: not two 8-digit dates, or from after to.
    """
    parts = spec.split("..")
    if len(parts) not in (1, 2) or not all(len(p) == 8 and p.isdigit() for p in parts):
        raise ValueError(f"a window is YYYYMMDD..YYYYMMDD (log dates, inclusive) or one YYYYMMDD; got {spec!r}")
    lo, hi = int(parts[0]), int(parts[-1])
    if lo > hi:
        raise ValueError(f"window {spec!r} starts after it ends")
    return lo, hi


def parse_recent(spec: str) -> float | None:
    """``"1h"`` / ``"24h"`` / ``"30m"`` -> seconds; None when ``spec`` is not such a duration."""
    spec = spec.strip().lower()
    if len(spec) >= 2 and spec[:-1].isdigit() and spec[-1] in "hm" and int(spec[:-1]) > 0:
        return int(spec[:-1]) * (3600.0 if spec[-1] == "h" else 60.0)
    return None


def production_window(state: StateDir, seconds: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The production sample of the last ``seconds`` (Redis server clock), and of the ``seconds``
    before them (the rolling reference; empty when the capped stream no longer has them).

    Raises:
        ValueError: nothing was sampled in that window (names the stream and what to check).
    """

    from core import online_layout
    from home_mixer.jobs import redis_url_for
    from monitoring.production import read_production_sample

    client = connect(redis_url_for(state))
    try:
        now = client.time()[0]
        frame = read_production_sample(client, since_s=now - seconds)
        before = read_production_sample(client, since_s=now - 2 * seconds, until_s=now - seconds - 0.001)
    finally:
        client.close()
    if frame.empty:
        raise ValueError(f"no production sample in the last {seconds / 3600:g} h ({online_layout.DRIFT_SAMPLE} is "
                         "empty there): is a mixer serving with drift_sample.enabled and a rate > 0?")
    return frame, before


# what the gate's evaluation reads of a training set besides the features
GATE_CONTEXT_COLUMNS = ("date", "request_ts", "user_id", "post_id", "author_id", "tag_id")


def served_rows(state: StateDir) -> tuple[pd.DataFrame, pd.Timestamp | None]:
    """The state's training set (features as served) with what ``monitoring.drift_eval`` reads,
    and ``state_origin``.

    Raises:
        FileNotFoundError: the state has no training set (run ``home-mixer features build``).
    """
    from monitoring.reference import monitored_features
    from pipelines.training_set import load_training_set

    frame = load_training_set(state)
    columns = [c for c in (*GATE_CONTEXT_COLUMNS, *monitored_features()) if c in frame.columns]
    return frame[columns], state_origin(state)


def state_origin(state: StateDir) -> pd.Timestamp | None:
    """Where the state's accumulated features start counting (``drift_forms.history_origin`` of
    the canonical log's first impression); None without an impressions table (features stay raw)."""
    from pipelines.training_set import log_span

    if not state.table("impressions").exists():
        return None
    return history_origin(pd.Timestamp(log_span(state)[0]))


def label_window(state: StateDir, frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """A production sample with its engagement labels from the state's impressions table.

    Only the sampled users' impressions are read (a parquet filter), then
    ``monitoring.production.label_production_sample`` joins them (window
    ``pipelines.logged_features.DEFAULT_LABEL_WINDOW_S``).

    Returns:
        (the frame, with float64 ``HEADS`` labels (NaN = unlabelled) and ``labelled`` when the
        table exists, else unchanged; ``{"labelled_rows": n, "labels": "<what was joined>"}`` for
        the report's ``current`` description).
    """
    from monitoring.production import label_production_sample
    from pipelines.logged_features import DEFAULT_LABEL_WINDOW_S

    path = state.table("impressions")
    if not path.exists():
        return frame, {"labelled_rows": 0, "labels": f"none: {path} does not exist"}
    users = sorted(int(u) for u in pd.unique(frame["user_id"]))
    impressions = pd.read_parquet(path, columns=["user_id", "post_id", "event_ts", *HEADS],
                                  filters=[("user_id", "in", users)])
    labelled = label_production_sample(frame, impressions, DEFAULT_LABEL_WINDOW_S)
    n = int(labelled["labelled"].sum())
    return labelled, {"labelled_rows": n,
                      "labels": f"{n} of {len(frame)} rows labelled by an impression within "
                                f"{DEFAULT_LABEL_WINDOW_S:g} s ({path.name})"}


def profile_training_window(state: StateDir, run_id: str, train_df: pd.DataFrame, heavy_fit) -> dict:
    """Log the reference profile of a heavy ranker's training window to its run; returns the profile."""
    days = sorted(int(d) for d in pd.unique(train_df["date"]))
    reference = build_reference(train_df, heavy_fit.predict, heads=heavy_fit.heads,
                                description=f"training days {days[0]}..{days[-1]}")
    log_reference(reference, run_id, state.mlflow_tracking_uri)
    return reference.profile


def scored_window(frame: pd.DataFrame, tracking_uri: str, alias: str = CHAMPION_ALIAS) -> pd.DataFrame:
    """``frame`` with ``score_<head>`` columns from the ``alias`` heavy ranker (float64)."""
    from models.registry import load_ranker

    heavy = load_ranker(HEAVY_RANKER_NAME, alias, tracking_uri)
    p = heavy.predict(frame).astype(np.float64)
    out = frame.copy()
    for j, h in enumerate(heavy.heads):
        out[score_column(h)] = p[:, j]
    return out


@dataclass
class DriftRun:
    """A drift job's outputs: the summary, where the HTML report and the JSON summary are, and the
    drift dashboard over every run of the state (None when the report went to ``out_dir``)."""

    summary: DriftSummary
    html: Path
    json: Path
    dashboard: Path | None = None


def run_drift(state: StateDir, window: str | None = None, against: str = CHAMPION_ALIAS,
              log: Path | None = None, data_dir: Path | None = None, method: str | None = None,
              max_drift_share: float | None = None, out_dir: Path | None = None,
              frame: pd.DataFrame | None = None, gate: DriftGateConfig | None = None) -> DriftRun:
    """Compare a current window with the reference and write the report.

    Features are compared in their declared forms (``monitoring.drift_forms``): those declared
    against the recent reference with the rolling one, the ``gate.recent_days`` dates of the
    training set before a dates window, or the production sample of the same length before a
    recent window (none for ``log`` and ``frame``: every feature against the reference).

    Args:
        window: ``1h`` / ``24h`` / ``<n>h`` / ``<n>m``: the mixer's production sample of that
            recent window; or ``FROM..TO`` dates of the state's training set (default: its last
            ``VALIDATION_DAYS`` dates); ignored with ``log`` or ``frame``.
        against: ``"champion"`` (the champion heavy ranker's reference profile) or ``FROM..TO``
            dates of the training set.
        log / data_dir: an impression log to featurise as the current window instead.
        frame: a ready current window (served-feature rows; scored here), e.g. a faulted copy.
        out_dir: report folder (default ``<state>/reports/drift/<UTC time>``).
        gate: the gate's thresholds (``DriftGateConfig()``); ``max_drift_share`` overrides its own.

    Raises:
        FileNotFoundError: no training set (run ``home-mixer features build``).
        ValueError: an empty window or a malformed date range.
        models.registry.RankerNotFoundError / monitoring.reference.ReferenceNotFoundError.
    """
    from pipelines.training_set import load_training_set

    uri = state.mlflow_tracking_uri
    training = None

    def training_rows(lo: int, hi: int) -> pd.DataFrame:
        nonlocal training
        if training is None:
            training = load_training_set(state)
        rows = training[(training["date"] >= lo) & (training["date"] <= hi)]
        if rows.empty:
            days = sorted(int(d) for d in pd.unique(training["date"]))
            raise ValueError(f"the training set has no rows dated {lo}..{hi} (it spans {days[0]}..{days[-1]})")
        return rows

    gate = gate or DriftGateConfig()
    if max_drift_share is not None:
        gate = gate.model_copy(update={"max_drift_share": max_drift_share})
    recent = parse_recent(window) if window and frame is None and log is None else None
    rolling, rolling_info = None, {}
    if frame is not None:
        current, current_info = frame, {"source": "frame"}
    elif recent is not None:
        served, rolling = production_window(state, recent)
        current, labels_info = label_window(state, served)
        current_info = {"source": f"production sample, last {window}", **labels_info}
        rolling_info = {"source": f"production sample, the {window} before"}
    elif log is not None:
        from home_mixer.evaluation import featurize_log
        from core.state import DEFAULT_DATA_DIR

        current = featurize_log(state, Path(log), data_dir or DEFAULT_DATA_DIR, None, None)
        current_info = {"source": f"log {Path(log).name}"}
    else:
        if window is None:
            training = load_training_set(state)
            days = sorted(int(d) for d in pd.unique(training["date"]))[-VALIDATION_DAYS:]
            lo, hi = days[0], days[-1]
        else:
            lo, hi = parse_dates(window)
        current, current_info = training_rows(lo, hi), {"source": f"training set dates {lo}..{hi}"}
        earlier = sorted(int(d) for d in pd.unique(training["date"]) if d < lo)[-gate.recent_days:]
        if earlier:
            rolling = training[training["date"].isin(earlier)]
            rolling_info = {"source": f"training set dates {earlier[0]}..{earlier[-1]}"}
    if recent is None:  # a production sample keeps the scores it was served with
        current = scored_window(current, uri)

    if against == CHAMPION_ALIAS:
        ref, version = load_reference(uri)
        reference = ref.sample
        reference_info = {"source": f"{HEAVY_RANKER_NAME} v{version} reference ({ref.profile.get('description', '')})"}
    else:
        lo, hi = parse_dates(against)
        reference = scored_window(training_rows(lo, hi), uri)
        reference_info = {"source": f"training set dates {lo}..{hi}"}

    runs = state.reports / RUNS_DIR
    folder = Path(out_dir) if out_dir else runs / time.strftime(RUN_TIME_FORMAT, time.gmtime())
    html = folder / "report.html"
    summary = compute_drift(reference, current, recent=rolling if rolling is not None and len(rolling) else None,
                            origin=state_origin(state), gate=gate, method=method, heads=HEADS, html_path=html,
                            reference_info=reference_info, current_info=current_info, recent_info=rolling_info)
    written = write_summary(summary, folder / SUMMARY_FILE)
    # the dashboard over all runs is redrawn after each one, so it is never stale
    dashboard = write_drift_dashboard(runs) if out_dir is None else None
    return DriftRun(summary=summary, html=html, json=written, dashboard=dashboard)
