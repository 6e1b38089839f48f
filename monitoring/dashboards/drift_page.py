"""A static drift dashboard: every drift run of a state folder on one self-contained HTML page.

Reads ``<drift_dir>/<run>/summary.json`` (``monitoring.drift.DriftSummary.to_dict``, written by
``home-mixer monitor drift``) for every run folder and writes one HTML page with plotly's
JavaScript inline, so it opens from disk in any browser with no network and no Grafana:

- the drift share of every run against its gate;
- for the latest run: drifted / monitored features per feature view, the top drifted features
  (statistic against threshold), prediction drift per head, label rate / AUC / ECE per head (when
  the window had labels) and the columns whose null share changed;
- every run with a relative link to its Evidently ``report.html``.

A summary that cannot be read (bad JSON, missing or mistyped keys) is skipped and named on the
page with the reason; keys added later (labels, null shares) are optional. Every text taken from a
summary is HTML-escaped.
"""

from __future__ import annotations

import calendar
import html
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from monitoring.drift import RUN_TIME_FORMAT, SUMMARY_FILE, ColumnDrift, DriftSummary, GateFault

REPORT_FILE = "report.html"
INDEX_FILE = "index.html"
TOP_FEATURES = 15
TOP_NULL_CHANGES = 20
PASS_COLOR, FAIL_COLOR, REFERENCE_COLOR, CURRENT_COLOR = "#2a9d54", "#d62728", "#7f7f7f", "#1f77b4"


@dataclass(frozen=True)
class DriftRunEntry:
    """One readable run: its folder, its summary and when it ran (epoch seconds)."""

    name: str
    folder: Path
    summary: DriftSummary
    when: float

    @property
    def report(self) -> Path:
        return self.folder / REPORT_FILE


@dataclass(frozen=True)
class SkippedRun:
    """A run folder left off the page, and why."""

    name: str
    reason: str


# ---------------------------------------------------------------- reading summaries

def _number(value, key: str, *, required: bool = True) -> float:
    """A JSON number as float (``null`` -> NaN: ``to_dict`` writes non-finite values as null)."""
    if value is None and not required:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} is {'missing' if value is None else type(value).__name__}, not a number")
    return float(value)


def _column(d, where: str) -> ColumnDrift:
    """A ``ColumnDrift`` from its JSON; older summaries may lack the null shares and test details."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: an entry is {type(d).__name__}, not an object")
    name = d.get("column")
    if not isinstance(name, str) or not isinstance(d.get("view"), str) or not isinstance(d.get("drifted"), bool):
        raise ValueError(f"{where}: an entry lacks column, view or drifted")
    method = d.get("method")
    dist_method = d.get("distribution_method")
    return ColumnDrift(
        column=name, view=d["view"], method=method if isinstance(method, str) else "?",
        statistic=_number(d.get("statistic"), f"{name}.statistic", required=False),
        threshold=_number(d.get("threshold"), f"{name}.threshold", required=False),
        drifted=d["drifted"],
        null_share_reference=_number(d.get("null_share_reference"), f"{name}.null_share_reference", required=False),
        null_share_current=_number(d.get("null_share_current"), f"{name}.null_share_current", required=False),
        distribution_method=dist_method if isinstance(dist_method, str) else None,
        distribution_statistic=_number(d.get("distribution_statistic"), f"{name}.distribution_statistic",
                                       required=False),
        distribution_threshold=_number(d.get("distribution_threshold"), f"{name}.distribution_threshold",
                                       required=False),
    )


def _fault(d: dict) -> GateFault:
    """A ``GateFault`` from its JSON (a critical fault fails the gate whatever the share)."""
    return GateFault(rule=str(d.get("rule", "?")), column=str(d.get("column", "?")),
                     value=_number(d.get("value"), "fault value", required=False),
                     threshold=_number(d.get("threshold"), "fault threshold", required=False),
                     detail=str(d.get("detail", "")))


def summary_from_dict(data) -> DriftSummary:
    """The ``DriftSummary`` of a ``summary.json`` (the inverse of ``DriftSummary.to_dict``).

    ``drift_share`` and ``max_drift_share`` are required; features, predictions, labels and the
    window descriptions default to empty.

    Raises:
        ValueError: not an object, a required key missing, or a key of the wrong type.
    """
    if not isinstance(data, dict):
        raise ValueError(f"the summary is a JSON {type(data).__name__}, not an object")
    share = _number(data.get("drift_share"), "drift_share")
    gate = _number(data.get("max_drift_share"), "max_drift_share")
    parts = {}
    for key in ("features", "predictions"):
        rows = data.get(key, [])
        if not isinstance(rows, list):
            raise ValueError(f"{key} is {type(rows).__name__}, not a list")
        parts[key] = [_column(d, key) for d in rows]
    for key in ("labels", "reference", "current"):
        if not isinstance(data.get(key, {}), dict):
            raise ValueError(f"{key} is {type(data[key]).__name__}, not an object")
    labels = data.get("labels", {})
    if not all(isinstance(v, dict) for v in labels.values()):
        raise ValueError("labels has a head that is not an object")
    faults = data.get("faults", [])
    if not isinstance(faults, list) or not all(isinstance(f, dict) for f in faults):
        raise ValueError("faults is not a list of objects")
    return DriftSummary(features=parts["features"], predictions=parts["predictions"], drift_share=share,
                        max_drift_share=gate, labels=labels, reference=data.get("reference", {}),
                        current=data.get("current", {}), faults=[_fault(f) for f in faults])


def _run_time(folder: Path, summary_path: Path) -> float:
    """The UTC time in the folder's name (drift_job's default), else the summary's mtime."""
    try:
        return float(calendar.timegm(time.strptime(folder.name, RUN_TIME_FORMAT)))
    except ValueError:
        return summary_path.stat().st_mtime


def load_runs(drift_dir: Path) -> tuple[list[DriftRunEntry], list[SkippedRun]]:
    """Every run folder directly under ``drift_dir``, oldest first, and the folders skipped.

    Reads ``<drift_dir>/*/summary.json``; a missing ``drift_dir`` has no runs. A folder without a
    summary (a run still writing, or a failed one) or with an unreadable one is skipped with the
    reason.

    Raises:
        NotADirectoryError: ``drift_dir`` exists and is not a folder.
    """
    drift_dir = Path(drift_dir)
    if not drift_dir.exists():
        return [], []
    if not drift_dir.is_dir():
        raise NotADirectoryError(f"{drift_dir} is not a folder of drift runs")
    runs, skipped = [], []
    for folder in sorted(p for p in drift_dir.iterdir() if p.is_dir()):
        path = folder / SUMMARY_FILE
        if not path.is_file():
            skipped.append(SkippedRun(folder.name, f"no {SUMMARY_FILE}"))
            continue
        try:
            summary = summary_from_dict(json.loads(path.read_text()))
            runs.append(DriftRunEntry(folder.name, folder, summary, _run_time(folder, path)))
        except (OSError, ValueError) as exc:  # ValueError covers bad JSON and bad UTF-8
            skipped.append(SkippedRun(folder.name, f"unreadable {SUMMARY_FILE}: {exc}"))
    runs.sort(key=lambda r: (r.when, r.name))
    return runs, skipped


# ---------------------------------------------------------------- figures

def _e(value) -> str:
    """HTML-escaped text (also for plotly labels, which render a subset of HTML tags)."""
    return html.escape(str(value), quote=True)


def _fmt(x: float, spec: str = ".4g") -> str:
    return "–" if x is None or not math.isfinite(x) else format(x, spec)


def _layout(fig, title: str, height: int = 380, top: int = 50):
    fig.update_layout(title=title, height=height, margin=dict(l=60, r=20, t=top, b=60), template="plotly_white",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def _share_figure(runs: list[DriftRunEntry]):
    import plotly.graph_objects as go

    names = [_e(r.name) for r in runs]
    hover = [f"{_e(r.name)}<br>{sum(c.drifted for c in r.summary.features)} / {len(r.summary.features)} features "
             f"drifted<br>{_e(r.summary.current.get('source', ''))}" for r in runs]
    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=names, y=[r.summary.drift_share for r in runs], mode="lines+markers", name="drift share",
        marker=dict(size=10, color=[PASS_COLOR if r.summary.passed else FAIL_COLOR for r in runs]),
        line=dict(color=CURRENT_COLOR), hovertext=hover, hoverinfo="text+y"))
    # each run carries its own gate (--max-drift-share); markers keep a one-run gate visible
    fig.add_trace(go.Scatter(
        x=names, y=[r.summary.max_drift_share for r in runs], mode="lines+markers", name="gate (max drift share)",
        line=dict(color=FAIL_COLOR, dash="dash"), marker=dict(symbol="line-ew-open", size=14, color=FAIL_COLOR)))
    fig.update_xaxes(type="category", title="run (UTC)")
    fig.update_yaxes(title="share of drifted features", tickformat=".0%", rangemode="tozero")
    return _layout(fig, "Drift share per run against the gate (red marker: gate failed)")


def _views_figure(summary: DriftSummary):
    import plotly.graph_objects as go

    views = sorted(summary.by_view().items())
    if not views:
        return None
    x = [_e(v) for v, _ in views]
    fig = go.Figure([
        go.Bar(x=x, y=[e["features"] for _, e in views], name="monitored", marker_color=REFERENCE_COLOR),
        go.Bar(x=x, y=[e["drifted"] for _, e in views], name="drifted", marker_color=FAIL_COLOR),
    ])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="features")
    return _layout(fig, "Drifted / monitored features per feature view")


def _predictions_figure(summary: DriftSummary):
    import plotly.graph_objects as go

    preds = summary.predictions
    if not preds:
        return None
    x = [_e(c.column) for c in preds]
    fig = go.Figure([
        go.Bar(x=x, y=[c.statistic for c in preds], name="statistic",
               marker_color=[FAIL_COLOR if c.drifted else PASS_COLOR for c in preds],
               hovertext=[f"{_e(c.method)} {_fmt(c.statistic)} (threshold {_fmt(c.threshold)}); "
                          f"{'drifted' if c.drifted else 'no drift'}" for c in preds], hoverinfo="text"),
        go.Scatter(x=x, y=[c.threshold for c in preds], mode="markers", name="threshold",
                   marker=dict(symbol="line-ew-open", size=30, color="black", line=dict(width=2))),
    ])
    fig.update_yaxes(title="test statistic")
    return _layout(fig, "Prediction drift per head (red: drifted; a p-value drifts below its threshold, "
                        "a distance at or above it)")


LABEL_METRICS = (("rate", "label rate"), ("auc", "AUC"), ("ece", "ECE"))


def _labels_figure(summary: DriftSummary):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    # a head whose current window had no labelled row carries a status and no current metric
    heads = sorted(h for h, e in summary.labels.items() if "status" not in e)
    if not heads:
        return None
    fig = make_subplots(rows=1, cols=len(LABEL_METRICS), subplot_titles=[t for _, t in LABEL_METRICS])
    for col, (metric, _) in enumerate(LABEL_METRICS, start=1):
        for side, color in (("reference", REFERENCE_COLOR), ("current", CURRENT_COLOR)):
            values = [summary.labels[h].get(f"{side}_{metric}") for h in heads]
            values = [v if isinstance(v, (int, float)) and not isinstance(v, bool) else None for v in values]
            fig.add_trace(go.Bar(x=[_e(h) for h in heads], y=values, name=side, marker_color=color,
                                 legendgroup=side, showlegend=col == 1), row=1, col=col)
    fig.update_layout(barmode="group")
    return _layout(fig, "Labels per head: rate, AUC and ECE, reference against current", height=420, top=90)


def _nulls_figure(summary: DriftSummary):
    import plotly.graph_objects as go

    changed = [c for c in summary.features + summary.predictions
               if math.isfinite(c.null_share_current - c.null_share_reference)
               and c.null_share_current != c.null_share_reference]
    changed.sort(key=lambda c: abs(c.null_share_current - c.null_share_reference), reverse=True)
    changed = changed[:TOP_NULL_CHANGES]
    if not changed:
        return None
    x = [_e(c.column) for c in changed]
    fig = go.Figure([
        go.Bar(x=x, y=[c.null_share_reference for c in changed], name="reference", marker_color=REFERENCE_COLOR),
        go.Bar(x=x, y=[c.null_share_current for c in changed], name="current", marker_color=CURRENT_COLOR),
    ])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title="null share", tickformat=".0%")
    return _layout(fig, f"Null share changes (top {TOP_NULL_CHANGES} columns by change; "
                        "a change above the tolerance flags the column)")


# ---------------------------------------------------------------- HTML

def _rule(c: ColumnDrift) -> str:
    if c.method == "null share":
        return "null share change above"
    return "p-value below" if "p_value" in c.method else "distance at or above"


def _top_features_table(summary: DriftSummary) -> str:
    worst = summary.drifted_features()[:TOP_FEATURES]
    if not worst:
        return '<p class="note">No feature drifted in this run.</p>'
    rows = "".join(
        f"<tr><td class='feature'>{_e(c.column)}</td><td>{_e(c.view)}</td><td>{_e(c.method)}</td>"
        f"<td class='num'>{_fmt(c.statistic)}</td><td>{_rule(c)}</td><td class='num'>{_fmt(c.threshold, 'g')}</td>"
        f"<td class='num'>{_fmt(c.null_share_reference, '.1%')} → {_fmt(c.null_share_current, '.1%')}</td></tr>"
        for c in worst)
    return ("<table id='top-features'><thead><tr><th>feature</th><th>view</th><th>method</th><th>statistic</th>"
            "<th>drifts when</th><th>threshold</th><th>nulls ref → cur</th></tr></thead>"
            f"<tbody>{rows}</tbody></table>")


def _labels_note(summary: DriftSummary) -> str:
    """What the label numbers rest on: labelled rows per side and heads without current labels."""
    parts = []
    if isinstance(summary.current.get("labels"), str):
        parts.append(f"current labels: {_e(summary.current['labels'])}")
    for side in ("reference", "current"):
        rows = [e.get(f"{side}_labelled_rows") for e in summary.labels.values()]
        rows = [r for r in rows if isinstance(r, int) and not isinstance(r, bool)]
        if rows:
            parts.append(f"{side} labelled rows: {max(rows)}")
    statuses = {}
    for h, e in sorted(summary.labels.items()):
        if "status" in e:
            statuses.setdefault(str(e["status"]), []).append(h)
    parts += [f"{_e(', '.join(heads))}: {_e(status)}" for status, heads in statuses.items()]
    return f"<p class='note' id='labels-note'>{'; '.join(parts)}.</p>" if parts else ""


def _report_link(run: DriftRunEntry, page_dir: Path) -> str:
    if not run.report.is_file():
        return f"{_e(run.name)} <span class='note'>(no {REPORT_FILE})</span>"
    href = quote(Path(os.path.relpath(run.report, page_dir)).as_posix())
    return f"<a class='report' href='{_e(href)}'>{_e(run.name)}</a>"


def _runs_table(runs: list[DriftRunEntry], page_dir: Path) -> str:
    rows = []
    for r in reversed(runs):  # newest first
        s = r.summary
        heads = [c.column for c in s.predictions if c.drifted]
        status = "<span class='pass'>PASS</span>" if s.passed else "<span class='fail'>FAIL</span>"
        rows.append(
            f"<tr><td>{_report_link(r, page_dir)}</td><td class='num'>{_fmt(s.drift_share, '.1%')}</td>"
            f"<td class='num'>{_fmt(s.max_drift_share, '.0%')}</td><td>{status}</td>"
            f"<td class='num'>{sum(c.drifted for c in s.features)} / {len(s.features)}</td>"
            f"<td>{_e(', '.join(heads) or 'none')}</td><td>{_e(s.current.get('source', '–'))}</td>"
            f"<td>{_e(s.reference.get('source', '–'))}</td></tr>")
    return ("<table id='runs'><thead><tr><th>run (Evidently report)</th><th>drift share</th><th>gate</th>"
            "<th>status</th><th>drifted features</th><th>drifted predictions</th><th>current window</th>"
            f"<th>reference</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _skipped_list(skipped: list[SkippedRun]) -> str:
    if not skipped:
        return ""
    items = "".join(f"<li><b>{_e(s.name)}</b>: {_e(s.reason)}</li>" for s in skipped)
    return (f"<section id='skipped'><h2>Skipped run folders ({len(skipped)})</h2>"
            f"<p class='note'>Left off this page:</p><ul>{items}</ul></section>")


class _Figures:
    """Plotly figures as HTML fragments; the first one carries plotly.js inline (no network needed)."""

    def __init__(self) -> None:
        self._first = True

    def html(self, fig, div_id: str) -> str:
        out = fig.to_html(full_html=False, include_plotlyjs=self._first, div_id=div_id,
                          config={"displaylogo": False, "responsive": True})
        self._first = False
        return out


def _panel(figures: _Figures, fig, div_id: str, empty_note: str) -> str:
    body = figures.html(fig, div_id) if fig is not None else f"<p class='note' id='{div_id}-empty'>{empty_note}</p>"
    return f"<section class='panel'>{body}</section>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { margin-bottom: 0.2em; } .note { color: #666; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.3em 0.7em; text-align: left; } td.num { text-align: right; }
.pass { color: #2a9d54; font-weight: bold; } .fail { color: #d62728; font-weight: bold; }
.panel { margin-bottom: 1.5em; } code { background: #f3f3f3; padding: 0.1em 0.3em; }
"""


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{STYLE}</style></head><body>{body}</body></html>\n")


def render_page(runs: list[DriftRunEntry], skipped: list[SkippedRun], drift_dir: Path, page_dir: Path) -> str:
    """The dashboard's HTML for ``runs`` (oldest first); links are relative to ``page_dir``."""
    generated = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    header = (f"<h1>Drift dashboard</h1><p class='note'>Runs in <code>{_e(drift_dir)}</code>; "
              f"page written {generated}. Refresh with <code>home-mixer monitor dashboard</code>.</p>")
    if not runs:
        empty = (f"<section id='empty'><h2>No drift runs yet</h2><p>No readable <code>{SUMMARY_FILE}</code> under "
                 f"<code>{_e(drift_dir)}</code>. Produce one with <code>home-mixer monitor drift</code> "
                 "(the validation days against the champion's training reference; <code>--window 1h</code> for the "
                 "mixer's production sample), then run <code>home-mixer monitor dashboard</code> again.</p></section>")
        return _page("Drift dashboard: no runs", header + empty + _skipped_list(skipped))

    latest = runs[-1]
    s = latest.summary
    figures = _Figures()
    status = "<span class='pass'>PASS</span>" if s.passed else "<span class='fail'>FAIL</span>"
    latest_header = (
        f"<h2>Latest run: {_e(latest.name)}</h2><p>drift share <b>{_fmt(s.drift_share, '.1%')}</b> of "
        f"{len(s.features)} features, gate {_fmt(s.max_drift_share, '.0%')}: {status}. Current: "
        f"{_e(s.current.get('source', '–'))} ({_e(s.current.get('rows', '–'))} rows); reference: "
        f"{_e(s.reference.get('source', '–'))} ({_e(s.reference.get('rows', '–'))} rows). "
        f"{_report_link(latest, page_dir)}</p>")
    if s.reasons():
        latest_header += "<p>Gate failed on: " + "; ".join(_e(r) for r in s.reasons()) + "</p>"
    body = [
        header,
        f"<h2>All runs ({len(runs)})</h2>",
        _panel(figures, _share_figure(runs), "drift-share", ""),
        latest_header,
        _panel(figures, _views_figure(s), "views", "This summary lists no features."),
        f"<h3>Top drifted features (at most {TOP_FEATURES}, strongest first)</h3>",
        _top_features_table(s),
        _panel(figures, _predictions_figure(s), "predictions", "This summary has no prediction drift (no scores)."),
        _panel(figures, _labels_figure(s), "labels",
               "No labels in this window: label rate, AUC and ECE need labelled rows on both sides."),
        _labels_note(s),
        _panel(figures, _nulls_figure(s), "nulls", "No column's null share changed."),
        "<h2>Runs</h2>", _runs_table(runs, page_dir),
        _skipped_list(skipped),
    ]
    return _page(f"Drift dashboard: {latest.name}", "".join(body))


def write_drift_dashboard(drift_dir: Path, out: Path | None = None) -> Path:
    """Write the drift dashboard of every run under ``drift_dir`` (``<state>/reports/drift``).

    Reads ``<drift_dir>/<run>/summary.json`` (unreadable ones are skipped and named on the page)
    and writes one self-contained HTML page to ``out`` (default ``<drift_dir>/index.html``;
    parents created), atomically, so a browser never loads half a page. With no runs, the page says
    how to produce one.

    Returns:
        the page's path.

    Raises:
        NotADirectoryError: ``drift_dir`` exists and is not a folder.
        OSError: the page cannot be written.
    """
    drift_dir = Path(drift_dir)
    out = Path(out) if out is not None else drift_dir / INDEX_FILE
    runs, skipped = load_runs(drift_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    page = render_page(runs, skipped, drift_dir, out.parent.resolve())
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
