"""The on-call Grafana dashboard (monitoring/dashboards/grafana.py): valid against Grafana 10.1's
schema, PromQL that promtool parses, only metrics the services export, every required panel, and
the committed JSON is what the code generates."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import prometheus_client as prom
import pytest
import yaml

from monitoring.dashboards.grafana import (COMMITTED_DASHBOARD, DATASOURCE_VAR, DashboardSchemaError,
                                           build_oncall_dashboard, check_dashboard, dashboard_text, iter_panels,
                                           panel_queries, schema_errors, write_oncall_dashboard)

promtool = shutil.which("promtool")


@pytest.fixture(scope="module")
def model() -> dict:
    return build_oncall_dashboard()


def test_the_dashboard_matches_grafanas_schema(model):
    assert schema_errors(model) == []
    assert check_dashboard(model) is model


@pytest.mark.parametrize("path, value, expected", [
    (("panels", 1, "gridPos", "w"), "12", "gridPos/w: '12' is not of type 'number'"),
    (("panels", 0, "collapsed"), "no", "collapsed: 'no' is not of type 'boolean'"),
    (("panels", 1, "targets", 0, "expr"), 42, "targets/0/expr: 42 is not of type 'string'"),
    (("panels", 1, "options", "legend", "placement"), "top", "legend/placement: 'top' is not one of"),
    (("panels", 1, "fieldConfig", "defaults", "custom", "lineWidth"), "1", "lineWidth: '1' is not of type"),
    (("panels", 1, "colour"), "red", "('colour' was unexpected)"),
    (("refresh",), 30, "refresh: 30 is not of type 'string'"),
])
def test_a_broken_copy_fails_the_schema(model, path, value, expected):
    broken = copy.deepcopy(model)
    node = broken
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    errors = schema_errors(broken)
    assert len(errors) == 1 and expected in errors[0], errors
    with pytest.raises(DashboardSchemaError, match=re.escape(expected)):
        check_dashboard(broken)


def test_panels_read_the_datasource_variable(model):
    (variable,) = model["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus" and variable["name"] == DATASOURCE_VAR
    panels = list(iter_panels(model))
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": f"${{{DATASOURCE_VAR}}}"}, p["title"]
        assert p["targets"] and all(t["datasource"] == p["datasource"] for t in p["targets"]), p["title"]


@pytest.mark.skipif(promtool is None, reason="promtool not on PATH: install Debian's prometheus (scripts/setup.sh)")
def test_every_panel_query_parses_as_promql(model, tmp_path):
    # promtool has no parse command; `check rules` parses each recording rule's expression
    queries = panel_queries(model)
    rules = [{"record": f"grafana:panel_query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
             for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}))
    res = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(rules)} rules found" in res.stdout
    assert not any("$" in r["expr"] for r in rules)  # no Grafana variable left unparsed


def _exported(registry) -> set[str]:
    names = set()
    for family in registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


def test_panels_use_only_metrics_the_services_export(model, tmp_path):
    from core.state import StateDir
    from mixer.metrics import MixerMetrics
    from monitoring.exporter import exporter_registry
    from pipelines.graph.metrics import FanoutMetrics
    from pipelines.streaming.metrics import StreamMetrics

    # the drift exporter yields its gauges only once there is a drift summary and a materialisation
    state = StateDir(tmp_path).ensure()
    summary = state.reports / "drift" / "20260101T000000Z" / "summary.json"
    summary.parent.mkdir(parents=True)
    summary.write_text(json.dumps({
        "features": [{"view": "user", "column": "u", "method": "K-S p_value", "statistic": 0.5, "drifted": False}],
        "predictions": [{"column": "score_click", "method": "Wasserstein", "statistic": 0.1, "drifted": False}],
        "drift_share": 0.0, "max_drift_share": 0.3}))
    from datetime import datetime, timezone

    state.record_materialization(datetime(2026, 1, 1, tzinfo=timezone.utc))
    exported = (_exported(MixerMetrics(prom.CollectorRegistry()).registry)
                | _exported(StreamMetrics(prom.CollectorRegistry()).registry)
                | _exported(FanoutMetrics(prom.CollectorRegistry()).registry)
                | _exported(exporter_registry(state)))
    used = {m for _, expr in panel_queries(model) for m in re.findall(r"\bhm_[a-z0-9_]+\b", expr)}
    assert used and used <= exported, used - exported
    assert {"hm_feature_drift_score", "hm_drift_share", "hm_prediction_drift_score", "hm_feature_age_seconds"} <= used


# requirement -> (metric, labels the query must group by, quantiles it must show)
REQUIRED = {
    "per-stage latency p50/p99": ("hm_mixer_stage_seconds_bucket", {"stage"}, {"0.5", "0.99"}),
    "request latency p50/p99": ("hm_mixer_request_seconds_bucket", set(), {"0.5", "0.99"}),
    "request rate by status": ("hm_mixer_requests_total", {"status"}, set()),
    "scoring fallbacks": ("hm_mixer_scoring_fallbacks_total", {"model", "backend", "reason"}, set()),
    "candidates per source": ("hm_mixer_candidates_total", {"source"}, set()),
    "source failure rate": ("hm_mixer_source_calls_total", {"source"}, set()),
    "stream lag p50/p99": ("hm_stream_event_to_online_seconds_bucket", {"topic"}, {"0.5", "0.99"}),
    "consumer lag": ("hm_stream_consumer_lag_entries", {"topic", "group"}, set()),
    "fan-out lag p50/p99": ("hm_fanout_lag_seconds_bucket", set(), {"0.5", "0.99"}),
    "fan-out backlog": ("hm_fanout_backlog_entries", {"topic", "group"}, set()),
    "drift per feature view": ("hm_feature_drifted", {"view"}, set()),
    "score distribution per head": ("hm_mixer_head_score_bucket", {"head"}, {"0.1", "0.5", "0.9"}),
}


@pytest.mark.parametrize("requirement", sorted(REQUIRED))
def test_the_required_panels_are_there(model, requirement):
    metric, labels, quantiles = REQUIRED[requirement]
    exprs = [e for _, e in panel_queries(model) if re.search(rf"\b{metric}\b", e)]
    assert exprs, requirement
    grouped = {lab.strip() for e in exprs for g in re.findall(r"by \(([^)]*)\)", e) for lab in g.split(",")}
    assert labels <= grouped, (requirement, grouped)
    shown = {q for e in exprs for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
    assert quantiles <= shown, (requirement, shown)


def test_required_stand_alone_panels(model):
    queries = panel_queries(model)
    exprs = " ".join(e for _, e in queries)
    assert 'status="unavailable"' in exprs and 'status="degraded"' in exprs  # errors and degraded answers
    failure = [e for _, e in queries if "hm_mixer_source_failures_total" in e and "hm_mixer_source_calls_total" in e]
    assert failure and "/" in failure[0]  # a ratio: failures / calls
    assert "hm_feature_age_seconds" in exprs and "hm_drift_share" in exprs and "hm_prediction_drift_score" in exprs
    assert [p["title"] for p in model["panels"] if p["type"] == "row"] == [
        "Requests", "Pipeline stages", "Candidate sources", "Scoring", "Features and stream", "Fan-out", "Drift"]


def test_the_committed_dashboard_is_what_the_code_generates(model, tmp_path):
    assert COMMITTED_DASHBOARD.read_text() == dashboard_text(model), (
        "monitoring/dashboards/home_mixer_oncall.json is stale: regenerate it with "
        "`python -c 'from monitoring.dashboards.grafana import write_oncall_dashboard as w; w()'`")
    out = write_oncall_dashboard(tmp_path / "nested" / "oncall.json")
    assert json.loads(out.read_text()) == model


def test_the_request_metrics_feed_the_new_panels():
    """``hm_mixer_head_score`` (served posts' per-head scores, NaN skipped) and
    ``hm_mixer_source_calls_total`` (every call, failed or not) come from the request-metrics side effect."""
    import math

    from mixer.candidate import Candidate, Query
    from mixer.candidate_sources.base import SourceResult
    from mixer.components import TimelineResult
    from mixer.metrics import MixerMetrics
    from mixer.side_effects import RequestMetricsSideEffect

    metrics = MixerMetrics(prom.CollectorRegistry())
    items = [Candidate(1, "trending", heads={"click": 0.4, "like": 0.004}),
             Candidate(2, "trending", heads={"click": 0.6, "like": math.nan}), Candidate(3, "search")]
    sources = [SourceResult("trending", "ok", items[:2]), SourceResult("search", "timeout")]
    result = TimelineResult(query=Query(user_id=7, page_size=3, now_s=0.0, request_id="r1"), items=items,
                            next_cursor=None, timings_ms={"total": 5.0}, source_results=sources, filtered={},
                            counts={}, model_versions={})
    effect = RequestMetricsSideEffect(metrics)
    effect.apply(result)
    effect.apply(result)
    value = metrics.registry.get_sample_value
    assert value("hm_mixer_head_score_count", {"head": "click"}) == 4
    assert value("hm_mixer_head_score_sum", {"head": "click"}) == pytest.approx(2.0)
    assert value("hm_mixer_head_score_count", {"head": "like"}) == 2  # the NaN is not observed
    assert value("hm_mixer_head_score_bucket", {"head": "like", "le": "0.005"}) == 2
    assert value("hm_mixer_source_calls_total", {"source": "trending"}) == 2
    assert value("hm_mixer_source_calls_total", {"source": "search"}) == 2
    assert value("hm_mixer_source_failures_total", {"source": "search", "reason": "timeout"}) == 2


def test_a_serving_stream_processor_becomes_a_prometheus_target(tmp_path):
    """The stream panels have data only if Prometheus scrapes the processor: ``serve(state=...)``
    records its port where ``monitoring.prometheus_server`` builds the file-SD targets."""
    from core.state import StateDir
    from monitoring.prometheus_server import PrometheusServer
    from pipelines.streaming.metrics import StreamMetrics, forget_metrics_endpoint, record_name

    state = StateDir(tmp_path).ensure()
    name = record_name("host/1")
    server, _ = StreamMetrics(prom.CollectorRegistry()).serve(0, state=state, name=name)
    try:
        targets = PrometheusServer(state).targets()["stream_processor"]
        assert targets == [{"name": "stream_processor-host_1", "address": f"127.0.0.1:{server.server_port}"}]
    finally:
        server.shutdown()
    forget_metrics_endpoint(state, name)
    assert PrometheusServer(state).targets()["stream_processor"] == []


def test_a_serving_fanout_worker_becomes_a_prometheus_target(tmp_path):
    """The fan-out panels have data only if Prometheus scrapes the workers (job ``fanout_worker``),
    and a stream processor's record is not mistaken for a worker's."""
    from core.state import StateDir
    from monitoring.prometheus_server import PrometheusServer
    from pipelines.graph.metrics import FanoutMetrics, record_name
    from pipelines.streaming.metrics import forget_metrics_endpoint

    state = StateDir(tmp_path).ensure()
    server, _ = FanoutMetrics(prom.CollectorRegistry()).serve(0, state=state, consumer="w/1")
    try:
        targets = PrometheusServer(state).targets()
        assert targets["fanout_worker"] == [{"name": "fanout_worker-w_1",
                                             "address": f"127.0.0.1:{server.server_port}"}]
        assert targets["stream_processor"] == []
    finally:
        server.shutdown()
    forget_metrics_endpoint(state, record_name("w/1"))
    assert PrometheusServer(state).targets()["fanout_worker"] == []
