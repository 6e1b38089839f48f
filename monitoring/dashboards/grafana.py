"""The on-call Grafana dashboard of home-mixer, built in code and checked against Grafana's schema.

:func:`build_oncall_dashboard` builds the dashboard with Grafana's typed builder SDK
(``grafana-foundation-sdk``) and returns its JSON model; :func:`write_oncall_dashboard` checks it
and writes it (``home-mixer monitor grafana``). Every query is PromQL on the metrics the services
export (``mixer/metrics.py``, ``pipelines/streaming/metrics.py``, ``monitoring/exporter.py``) and
reads the Prometheus chosen in the ``datasource`` template variable, so the file imports into any
Grafana (Dashboards > New > Import). Rows, top to bottom: requests (rate by status, unavailable and
degraded shares, latency p50/p99, side-effect failures), pipeline stages (latency p50 and p99 per
stage), candidate sources (candidates per request per source, failure rate per source, removals
per filter), scoring (paths, fallbacks, served score p10/p50/p90 per head), features and stream
(freshness, event-to-online lag p50/p99, consumer lag and pending entries, events by outcome),
drift (drift share against its gate, drifted share and drift statistic per feature view, prediction
drift per head, age of the drift run).

Schema check (:func:`schema_errors`). The SDK's own ``from_json`` decoders copy values without
checking their types, and the SDK ships no JSON schema, so the check uses
``grafana_10.1_schema.json`` beside this file: JSON Schemas (draft 7) generated with
``ts-json-schema-generator`` 2.9.0 from the TypeScript types Grafana publishes in the npm package
``@grafana/schema`` 10.1.9 (Apache-2.0), which Grafana generates from the same CUE kind schemas as
the SDK 10.1 pinned here. It checks the dashboard kind (every field's type, required fields, no
unknown fields, panels as ``Panel`` or ``RowPanel``, template variables, grid positions), and per
panel its plugin ``options`` (timeseries, stat), the timeseries ``fieldConfig.defaults.custom`` and
every Prometheus query (``PrometheusDataQuery``). It cannot check what Grafana checks at run time
(that the data source exists, that PromQL is valid: the unit test parses every query with
``promtool``). To regenerate the schema file (node >= 20, in a scratch folder)::

    npm install ts-json-schema-generator@2.9.0 @grafana/schema@10.1.9
    npx ts-json-schema-generator --no-type-check --expose export --type Dashboard \\
        --path node_modules/@grafana/schema/dist/esm/raw/dashboard/x/dashboard_types.gen.d.ts
    # likewise Options / FieldConfig of raw/composable/{timeseries,stat}/panelcfg/x/*_types.gen.d.ts
    # and PrometheusDataQuery of raw/composable/prometheus/dataquery/x/*; then nest them as the file does

The file keeps the schemas under ``dashboard``, ``panels.<type>.options`` / ``.fieldConfig`` and
``dataqueries.prometheus``, with its sources under ``source``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "grafana_10.1_schema.json"
COMMITTED_DASHBOARD = HERE / "home_mixer_oncall.json"  # the generated file, kept in the repo
DASHBOARD_UID = "home-mixer-oncall"
DATASOURCE_VAR = "datasource"
RATE = "$__rate_interval"  # Grafana's window for rate(): at least 4 scrape intervals


class DashboardSchemaError(ValueError):
    """The dashboard JSON does not match Grafana's schema; ``errors`` lists each mismatch."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__(f"{len(errors)} schema error(s): " + "; ".join(errors[:5]))


@dataclass(frozen=True)
class Query:
    """One PromQL target: ``expr`` and its series name (``legend``, Grafana ``{{label}}`` syntax)."""

    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    """One panel: ``kind`` "timeseries" (over time) or "stat" (the latest value); ``unit`` is a
    Grafana unit id ("s", "reqps", "percentunit", "short", "ops"); ``red`` a threshold drawn red."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    description: str = ""
    kind: str = "timeseries"
    red: float | None = None
    width: int = 12


def _rate(metric: str, by: str = "", selector: str = "") -> str:
    grouping = f"sum by ({by}) " if by else "sum"
    return f"{grouping}(rate({metric}{selector}[{RATE}]))"


def _quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({histogram}_bucket[{RATE}])))"


# requests that ran the pipeline: not the 503s (Redis down, or refused at the in-flight bound)
PIPELINE_REQUESTS = _rate("hm_mixer_requests_total", selector='{status!~"unavailable|overloaded"}')


def _share(status: str) -> str:
    """Share of all requests (refused ones included) answered with ``status``."""
    selector = '{status="%s"}' % status
    return f'{_rate("hm_mixer_requests_total", selector=selector)} / {_rate("hm_mixer_requests_total")}'


def oncall_rows() -> list[tuple[str, list[PanelSpec]]]:
    """The dashboard's rows: ``[(row title, [PanelSpec])]``, in display order."""
    return [
        ("Requests", [
            PanelSpec("Request rate by status", (Query(_rate("hm_mixer_requests_total", "status"), "{{status}}"),),
                      "reqps", "Home-timeline requests per second: ok, degraded (a stage failed open), "
                      "unavailable (503: Redis down, or failed stages left no page), overloaded (503, refused at the "
                      "in-flight bound)."),
            PanelSpec("Unavailable, overloaded and degraded share",
                      (Query(_share("unavailable"), "unavailable (503)"),
                       Query(_share("overloaded"), "overloaded (503)"),
                       Query(_share("degraded"), "degraded")),
                      "percentunit", "Share of requests answered 503 (Redis down; in-flight bound), and served "
                      "with a failed-open stage."),
            PanelSpec("Request latency p50 / p99", (Query(_quantile(0.5, "hm_mixer_request_seconds"), "p50"),
                                                    Query(_quantile(0.99, "hm_mixer_request_seconds"), "p99")),
                      "s", "Whole request, from the mixer's histogram (alert: p99 > 100 ms).", red=0.1),
            PanelSpec("Queue wait p50 / p99 and quality factor",
                      (Query(_quantile(0.5, "hm_mixer_queue_wait_seconds"), "wait p50"),
                       Query(_quantile(0.99, "hm_mixer_queue_wait_seconds"), "wait p99"),
                       Query("min(hm_mixer_quality_factor)", "lowest quality factor")),
                      "s", "Admitted requests' wait for an execution slot before the pipeline (mixer.admission; "
                      "the caller sees it plus the request latency), and the lowest worker's quality factor "
                      "(1 = full work; below 1 the mixer sheds candidates under latency)."),
            PanelSpec("Side-effect failures", (Query(_rate("hm_mixer_side_effect_failures_total", "side_effect"),
                                                     "{{side_effect}}"),),
                      "ops", "Impression log, served posts, feature log, drift sample: failures per second "
                      "(fail-open: the page was served)."),
        ]),
        ("Pipeline stages", [
            PanelSpec("Stage latency p50", (Query(_quantile(0.5, "hm_mixer_stage_seconds", "stage"), "{{stage}}"),),
                      "s", "Median wall time per pipeline stage."),
            PanelSpec("Stage latency p99", (Query(_quantile(0.99, "hm_mixer_stage_seconds", "stage"), "{{stage}}"),),
                      "s", "99th percentile wall time per pipeline stage."),
        ]),
        ("Candidate sources", [
            PanelSpec("Candidates per request by source",
                      (Query(f'{_rate("hm_mixer_candidates_total", "source")} / on () group_left () '
                             f"{PIPELINE_REQUESTS}", "{{source}}"),),
                      "short", "Each source's contribution: candidates it returned per pipeline request."),
            PanelSpec("Source failure rate", (Query(f'{_rate("hm_mixer_source_failures_total", "source")} / '
                                                    f'{_rate("hm_mixer_source_calls_total", "source")}',
                                                    "{{source}}"),),
                      "percentunit", "Failed (timeout or error) calls / calls, per source (alert: > 5 %).", red=0.05),
            PanelSpec("Source failures by reason", (Query(_rate("hm_mixer_source_failures_total", "source, reason"),
                                                          "{{source}} {{reason}}"),), "ops"),
            PanelSpec("Candidates removed per filter", (Query(_rate("hm_mixer_filtered_total", "filter"),
                                                              "{{filter}}"),), "ops"),
        ]),
        ("Scoring", [
            PanelSpec("Ranker calls by path", (Query(_rate("hm_mixer_scoring_total", "model, path"),
                                                     "{{model}} {{path}}"),),
                      "ops", "in_process, a remote backend (triton_grpc, triton_http, bentoml) or "
                      "in_process_fallback."),
            PanelSpec("Scoring fallbacks", (Query(_rate("hm_mixer_scoring_fallbacks_total", "model, backend, reason"),
                                                  "{{model}} {{backend}} {{reason}}"),),
                      "ops", "Remote ranker calls answered in-process instead (alert: > 1 % of requests)."),
            PanelSpec("Served score per head: p10 / p50 / p90",
                      tuple(Query(_quantile(q, "hm_mixer_head_score", "head"), f"{{{{head}}}} p{round(q * 100)}")
                            for q in (0.1, 0.5, 0.9)),
                      "percentunit", "The heavy ranker's probability per head of the posts served "
                      "(hm_mixer_head_score); a shift here without a model change is input drift.", width=24),
        ]),
        ("Features and stream", [
            PanelSpec("Batch feature age", (Query("max(hm_feature_age_seconds)", "age"),), "s",
                      "Time since the last materialize of the online store (alert: > 2 h).", kind="stat", red=7200,
                      width=6),
            PanelSpec("Stream lag p99 (worst topic)",
                      (Query(f'max({_quantile(0.99, "hm_stream_event_to_online_seconds", "topic")})', "p99"),),
                      "s", "Event time to online-store write (alert: > 1 s).", kind="stat", red=1.0, width=6),
            PanelSpec("Stream event-to-online lag p50 / p99",
                      (Query(_quantile(0.5, "hm_stream_event_to_online_seconds", "topic"), "{{topic}} p50"),
                       Query(_quantile(0.99, "hm_stream_event_to_online_seconds", "topic"), "{{topic}} p99")),
                      "s", "Freshness of the real-time features, per topic.", red=1.0),
            PanelSpec("Consumer lag and pending entries",
                      (Query("sum by (topic, group) (hm_stream_consumer_lag_entries)", "{{topic}}/{{group}} lag"),
                       Query("sum by (topic, group) (hm_stream_pending_entries)", "{{topic}}/{{group}} pending"),
                       Query("sum by (topic) (hm_stream_dead_letters)", "{{topic}} dead letters")),
                      "short", "Entries not yet delivered to the group, delivered but not acknowledged, "
                      "and dead-lettered."),
            PanelSpec("Stream events by outcome", (Query(_rate("hm_stream_events_total", "topic, outcome"),
                                                         "{{topic}} {{outcome}}"),), "ops"),
        ]),
        ("Fan-out", [
            PanelSpec("Fan-out lag p50 / p99",
                      (Query(_quantile(0.5, "hm_fanout_lag_seconds", ""), "p50"),
                       Query(_quantile(0.99, "hm_fanout_lag_seconds", ""), "p99")),
                      "s", "Post created to its last follower's home timeline written (alert: p99 > 5 s).", red=5.0),
            PanelSpec("Fan-out deliveries/s and backlog",
                      (Query("sum(rate(hm_fanout_deliveries_total[$__rate_interval]))", "deliveries/s"),
                       Query("sum by (topic, group) (hm_fanout_backlog_entries)", "{{topic}}/{{group}} backlog")),
                      "short", "Home-timeline entries written per second, and posts not yet fanned out."),
            PanelSpec("Fan-out posts by outcome, retries",
                      (Query(_rate("hm_fanout_posts_total", "outcome"), "{{outcome}}"),
                       Query("sum(rate(hm_fanout_retries_total[$__rate_interval]))", "retries")),
                      "ops", "fanned_out, celebrity_skipped (pulled at read), duplicate, failed; retries = posts "
                      "resumed after a worker stopped mid-post."),
        ]),
        ("Drift", [
            PanelSpec("Drift share vs gate", (Query("max(hm_drift_share)", "drift share"),
                                              Query("max(hm_drift_gate)", "gate")),
                      "percentunit", "Share of monitored features the latest drift run flagged (alert: > 30 %).",
                      red=0.3),
            PanelSpec("Drifted share per feature view", (Query("avg by (view) (hm_feature_drifted)", "{{view}}"),),
                      "percentunit", "Drifted features / monitored features, per feature view, latest drift run."),
            PanelSpec("Drift statistic per feature", (Query("hm_feature_drift_score", "{{view}}/{{feature}} "
                                                                                      "({{method}})"),),
                      "short", "The test's statistic per feature, grouped by view: a p-value (K-S, chi-square: "
                      "low = drift) or a distance (Wasserstein, PSI, Jensen-Shannon: high = drift)."),
            PanelSpec("Prediction drift per head", (Query("hm_prediction_drift_score", "{{head}} ({{method}})"),),
                      "short", "Drift statistic of each head's served score against the champion's reference."),
            PanelSpec("Drift run age", (Query("time() - max(hm_drift_summary_timestamp_seconds)", "age"),), "s",
                      "Time since the latest drift summary was written.", kind="stat", width=6),
        ]),
    ]


def _panel(spec: PanelSpec, datasource: Any):
    """The SDK builder of one panel (targets refId A, B, ...)."""
    from grafana_foundation_sdk.builders import common, dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.models import common as cm
    from grafana_foundation_sdk.models import dashboard as dm

    if spec.kind == "stat":
        panel = (stat.Panel().graph_mode(cm.BigValueGraphMode.AREA).color_mode(cm.BigValueColorMode.VALUE)
                 .justify_mode(cm.BigValueJustifyMode.AUTO).text_mode(cm.BigValueTextMode.AUTO)
                 .orientation(cm.VizOrientation.AUTO)
                 .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False)))
    elif spec.kind == "timeseries":
        panel = (timeseries.Panel().line_width(1).fill_opacity(10).show_points(cm.VisibilityMode.NEVER)
                 .legend(common.VizLegendOptions().display_mode(cm.LegendDisplayMode.LIST)
                         .placement(cm.LegendPlacement.BOTTOM).show_legend(True).calcs([]))
                 .tooltip(common.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)))
    else:
        raise ValueError(f"panel {spec.title!r}: kind {spec.kind!r} is not 'timeseries' or 'stat'")
    steps = [dm.Threshold(value=None, color="green")]
    if spec.red is not None:
        steps.append(dm.Threshold(value=spec.red, color="red"))
    panel = (panel.title(spec.title).datasource(datasource).unit(spec.unit).span(spec.width).height(8)
             .thresholds(dashboard.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps)))
    if spec.description:
        panel = panel.description(spec.description)
    for i, q in enumerate(spec.queries):
        target = prometheus.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).datasource(datasource)
        panel = panel.with_target(target.legend_format(q.legend) if q.legend else target)
    return panel


def build_oncall_dashboard(title: str = "home-mixer on-call", uid: str = DASHBOARD_UID,
                           refresh: str = "30s") -> dict:
    """The on-call dashboard's JSON model (a ``dict`` ready for ``json.dumps``; see the module docstring).

    Args:
        title: dashboard title.
        uid: dashboard uid (8-40 characters; importing a dashboard with the same uid replaces it).
        refresh: auto-refresh interval ("30s", "1m", ...).

    Raises:
        ValueError: a panel spec has an unknown kind.
    """
    from grafana_foundation_sdk.builders import dashboard
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import dashboard as dm

    datasource = dm.DataSourceRef(type_val="prometheus", uid=f"${{{DATASOURCE_VAR}}}")
    builder = (dashboard.Dashboard(title).uid(uid).tags(["home-mixer", "on-call"]).refresh(refresh)
               .time("now-3h", "now").timezone("browser").tooltip(dm.DashboardCursorSync.CROSSHAIR)
               .description("home-mixer on-call: mixer requests and stages, candidate sources, scoring, feature "
                            "freshness, stream lag and drift. Generated by monitoring/dashboards/grafana.py.")
               .with_variable(dashboard.DatasourceVariable(DATASOURCE_VAR).label("Prometheus").type("prometheus")))
    for row_title, panels in oncall_rows():
        builder = builder.with_row(dashboard.Row(row_title))
        for spec in panels:
            builder = builder.with_panel(_panel(spec, datasource))
    model = builder.build()
    for variable in model.templating.list_val or []:
        # the SDK fills the interval variable's auto* fields on every variable; the 10.1 schema has none
        variable.auto = variable.auto_min = variable.auto_count = None
    for i, panel in enumerate(model.panels or [], start=1):
        panel.id_val = i  # Grafana needs unique panel ids for links and edits; the SDK leaves them unset/0
    return json.loads(json.dumps(model, cls=JSONEncoder))


@lru_cache(maxsize=1)
def _schemas() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def _leaf_errors(error) -> list:
    """The errors to report for ``error``: for an ``anyOf`` (a panel is a ``Panel`` or a ``RowPanel``),
    those of the branch the value means to be (the one whose ``type`` constant matched, else the
    one with the fewest errors), not "is not valid under any of the given schemas"."""
    if error.validator != "anyOf" or not error.context:
        return [error]
    branches: dict[int, list] = {}
    for sub in error.context:
        branches.setdefault(sub.schema_path[0], []).append(sub)
    wrong_kind = {b for b, subs in branches.items()
                  if any(list(s.schema_path)[-3:] == ["properties", "type", "const"] for s in subs)}
    candidates = [b for b in branches if b not in wrong_kind] or list(branches)
    best = min(candidates, key=lambda b: len(branches[b]))
    return [leaf for sub in branches[best] for leaf in _leaf_errors(sub)]


def _errors(schema: dict, instance: Any, where: str) -> Iterator[str]:
    from jsonschema import Draft7Validator

    leaves = [leaf for e in Draft7Validator(schema).iter_errors(instance) for leaf in _leaf_errors(e)]
    for e in sorted(leaves, key=lambda e: [str(p) for p in e.absolute_path]):
        path = "/".join(str(p) for p in e.absolute_path)
        yield f"{where}{'/' + path if path else ''}: {e.message[:300]}"


def iter_panels(model: dict) -> Iterator[dict]:
    """Every panel of a dashboard JSON model that is not a row (collapsed rows' panels included)."""
    for panel in model.get("panels") or []:
        if panel.get("type") == "row":
            yield from panel.get("panels") or []
        else:
            yield panel


def panel_queries(model: dict) -> list[tuple[str, str]]:
    """``[(panel title, PromQL expr)]`` of every Prometheus target of a dashboard JSON model."""
    return [(p.get("title", ""), t["expr"]) for p in iter_panels(model) for t in p.get("targets") or []
            if isinstance(t, dict) and "expr" in t]


def schema_errors(model: dict) -> list[str]:
    """Where ``model`` departs from Grafana 10.1's schema (see the module docstring): the dashboard
    kind, then each panel's options / timeseries field config and each Prometheus target.
    ``[]`` when it conforms. Each error is ``"<json path>: <message>"``."""
    s = _schemas()
    errors = list(_errors(s["dashboard"], model, "dashboard"))
    for i, panel in enumerate(iter_panels(model)):
        if not isinstance(panel, dict):
            continue
        where = f"panel {i} ({panel.get('title', '?')})"
        plugin = s["panels"].get(panel.get("type"))
        if plugin is None:
            errors.append(f"{where}: panel type {panel.get('type')!r} has no schema here "
                          f"(known: {sorted(s['panels'])})")
            continue
        errors += _errors(plugin["options"], panel.get("options"), f"{where}/options")
        custom = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("custom")
        if "fieldConfig" in plugin and custom is not None:
            errors += _errors(plugin["fieldConfig"], custom, f"{where}/fieldConfig/defaults/custom")
        for j, target in enumerate(panel.get("targets") or []):
            errors += _errors(s["dataqueries"]["prometheus"], target, f"{where}/targets/{j}")
    return errors


def check_dashboard(model: dict) -> dict:
    """``model`` if :func:`schema_errors` finds nothing.

    Raises:
        DashboardSchemaError: with every mismatch.
    """
    errors = schema_errors(model)
    if errors:
        raise DashboardSchemaError(errors)
    return model


def dashboard_text(model: dict) -> str:
    """The JSON file content: 2-space indent, keys in the builder's order, trailing newline."""
    return json.dumps(model, indent=2) + "\n"


def write_oncall_dashboard(path: Path | str = COMMITTED_DASHBOARD) -> Path:
    """Build the on-call dashboard, check it against the schema and write it to ``path`` (folders
    created); returns the path.

    Raises:
        DashboardSchemaError: the built dashboard does not match the schema (nothing written).
        OSError: ``path`` cannot be written.
    """
    path = Path(path)
    text = dashboard_text(check_dashboard(build_oncall_dashboard()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


__all__ = ["DashboardSchemaError", "PanelSpec", "Query", "build_oncall_dashboard", "check_dashboard",
           "iter_panels", "oncall_rows", "panel_queries", "schema_errors", "write_oncall_dashboard"]
