"""monitoring.exporter: the latest drift summary and the features' freshness as Prometheus gauges."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import httpx
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from core.state import StateDir
from monitoring.exporter import DriftExporterServer, exporter_registry, latest_summary


def _summary(share: float) -> dict:
    return {
        "passed": share <= 0.3, "drift_share": share, "max_drift_share": 0.3,
        "features": [
            {"column": "post_duration_ms", "view": "content_features", "method": "Wasserstein distance (normed)",
             "statistic": 1011.0, "threshold": 0.1, "drifted": True},
            {"column": "user_lt_click_rate", "view": "user_longterm_features", "method": "null share",
             "statistic": 0.2, "threshold": 0.05, "drifted": True},
            {"column": "ua_clicks", "view": "social_features", "method": "none (no values)",
             "statistic": None, "threshold": None, "drifted": False},
        ],
        "predictions": [{"column": "score_click", "view": "prediction", "method": "K-S p_value",
                         "statistic": 0.5, "threshold": 0.05, "drifted": False}],
    }


def _samples(state: StateDir) -> dict[tuple, float]:
    text = generate_latest(exporter_registry(state)).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_gauges_come_from_the_newest_summary(tmp_path):
    state = StateDir(tmp_path).ensure()
    assert _samples(state) == {}  # nothing yet: no series rather than zeros
    for stamp, share in (("20261202T100000Z", 0.9), ("20261202T110000Z", 0.5)):
        folder = state.reports / "drift" / stamp
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(_summary(share)))
    (state.reports / "drift" / "20261202T120000Z").mkdir()  # a run still writing: skipped
    assert latest_summary(state)[1].parent.name == "20261202T110000Z"
    got = _samples(state)
    assert got[("hm_drift_share", ())] == 0.5 and got[("hm_drift_gate", ())] == 0.3
    assert got[("hm_feature_drift_score", (("feature", "post_duration_ms"), ("method", "Wasserstein distance (normed)"),
                                           ("view", "content_features")))] == 1011.0
    assert got[("hm_feature_drifted", (("feature", "user_lt_click_rate"), ("view", "user_longterm_features")))] == 1.0
    assert got[("hm_feature_drifted", (("feature", "ua_clicks"), ("view", "social_features")))] == 0.0
    assert not any(k[0] == "hm_feature_drift_score" and ("feature", "ua_clicks") in k[1] for k in got)
    assert got[("hm_prediction_drift_score", (("head", "click"), ("method", "K-S p_value")))] == 0.5
    assert got[("hm_drift_gate_passed", ())] == 0.0  # a share of 0.5 fails
    assert not any(k[0] == "hm_drift_fault" for k in got)


def test_a_critical_fault_is_a_series_and_fails_the_gate_gauge(tmp_path):
    state = StateDir(tmp_path).ensure()
    folder = state.reports / "drift" / "20261202T110000Z"
    folder.mkdir(parents=True)
    summary = _summary(0.05) | {"passed": False, "faults": [
        {"rule": "missing", "column": "user_follow_num", "value": 1.0, "threshold": 1.0, "detail": "every value missing"}]}
    (folder / "summary.json").write_text(json.dumps(summary))
    got = _samples(state)
    assert got[("hm_drift_share", ())] == 0.05 and got[("hm_drift_gate_passed", ())] == 0.0
    assert got[("hm_drift_fault", (("feature", "user_follow_num"), ("rule", "missing")))] == 1.0


def test_feature_age_follows_the_last_materialization(tmp_path):
    state = StateDir(tmp_path).ensure()
    state.record_materialization(datetime(2022, 5, 4, 16, tzinfo=timezone.utc))
    record = json.loads(state.materialization_record.read_text())
    record["materialized_at"] -= 3 * 3600  # materialised three hours ago
    state.materialization_record.write_text(json.dumps(record))
    got = _samples(state)
    assert got[("hm_feature_age_seconds", ())] == pytest.approx(3 * 3600, abs=60)
    assert got[("hm_feature_materialized_until_seconds", ())] == datetime(2022, 5, 4, 16, tzinfo=timezone.utc).timestamp()


def test_exporter_service_serves_metrics_and_stops(tmp_path):
    state = StateDir(tmp_path).ensure()
    folder = state.reports / "drift" / "20261202T110000Z"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(_summary(0.4)))
    server = DriftExporterServer(state).start()
    try:
        assert DriftExporterServer.find(state).port == server.port
        body = httpx.get(f"{server.url}/metrics", timeout=5).text
        assert "hm_drift_share 0.4" in body
    finally:
        server.stop()
    assert DriftExporterServer.find(state) is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/metrics", timeout=1)
