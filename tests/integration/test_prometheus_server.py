"""Debian's Prometheus for real: ``PrometheusServer`` scrapes a real mixer (real Redis, rankers in a
temporary MLflow, started as ``MixerServer`` so it is in the state's run records), a metric comes
back through ``/api/v1/query``, the alert rules are loaded, and stop leaves nothing behind."""

from __future__ import annotations

import json
import time

import httpx
import psutil
import pytest
import redis
import yaml

from core.services import log_tail, port_is_free, wait_port_free
from core.state import PROJECT_ROOT, StateDir
from tests.integration.test_mixer_api import AS_OF, known_users, prepare_served_state  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(__import__("shutil").which("prometheus") is None,
                       reason="prometheus not on PATH: install Debian's prometheus (scripts/setup.sh does it)"),
]

ALERTS = {"HomeMixerDriftShareHigh", "HomeMixerDriftFault", "HomeMixerFeaturesStale", "HomeMixerStreamLagHigh", "HomeMixerFanoutLagHigh",
          "HomeMixerLatencyP99High", "HomeMixerScoringFallbackRateHigh", "HomeMixerSourceFailureRateHigh"}


@pytest.fixture(scope="module")
def monitored_mixer(tmp_path_factory, data_dir, redis_server, known_users):  # noqa: F811
    """A real mixer of a fresh state folder, started through ``MixerServer`` (record in run/mixer.json),
    with ``/metrics`` behind its bearer token."""
    from mixer.server import MixerServer

    state = StateDir(tmp_path_factory.mktemp("prometheus_state")).ensure()
    url, client = prepare_served_state(state, data_dir, redis_server, known_users)
    config = state.root / "mixer.yaml"
    config.write_text(yaml.safe_dump({"redis_url": url, "models": {"tracking_uri": state.mlflow_tracking_uri},
                                      "clock": {"now": AS_OF.isoformat().replace("+00:00", "Z")},
                                      "drift_sample": {"rate": 1.0, "per_request": 10},
                                      # the scrape must send the state folder's token
                                      "auth": {"protect_metrics": True}}))
    mixer = MixerServer(state, config=config, redis_url=url).start(timeout_s=180)
    try:
        yield state, mixer
    finally:
        mixer.stop()
        client.close()


def _wait(what: str, probe, timeout_s: float = 40.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def test_prometheus_scrapes_the_mixer_and_loads_the_alert_rules(monitored_mixer, known_users):  # noqa: F811
    from monitoring.prometheus_server import PrometheusServer

    from monitoring.drift import compute_drift, write_summary
    from monitoring.exporter import DriftExporterServer
    from monitoring.production import read_production_sample

    state, mixer = monitored_mixer
    with httpx.Client(base_url=mixer.url, timeout=30, headers=mixer.auth_headers) as http:
        for user in known_users[:3]:
            assert http.post("/v1/home-timeline", json={"user_id": user, "limit": 5}).status_code == 200
    assert httpx.get(f"{mixer.url}/metrics", timeout=10).status_code == 401  # Prometheus must send the token
    # every request is sampled (rate 1): the production sample holds its heavy-ranked candidates
    client = redis.Redis.from_url(mixer.redis_url)
    sample = read_production_sample(client)
    client.close()
    assert sample["request_id"].nunique() == 3 and len(sample) <= 30 and sample["score_click"].notna().all()
    # a drift run over it, served by the exporter, comes back through Prometheus
    summary = compute_drift(sample, sample)
    write_summary(summary, state.reports / "drift" / "20261202T000000Z" / "summary.json")
    exporter = DriftExporterServer(state).start()

    prom = PrometheusServer(state, scrape_interval_s=2.0).start()
    try:
        assert PrometheusServer.find(state).pid == prom.pid
        assert json.loads((state.run / "prometheus.json").read_text())["ports"]["port"] == prom.port
        config = yaml.safe_load(prom.config_file.read_text())
        assert config["rule_files"] == [str(PROJECT_ROOT / "monitoring" / "prometheus" / "alerts.yml")]
        assert config["global"]["scrape_interval"] == "2000ms"
        assert f"--storage.tsdb.path={state.root / 'prometheus' / 'data'}" in psutil.Process(prom.pid).cmdline()
        assert {j["job_name"] for j in config["scrape_configs"]} == {"mixer", "stream_processor", "fanout_worker",
                                                                     "drift_exporter", "haproxy", "prometheus"}
        assert json.loads((prom.targets_dir / "mixer.json").read_text())[0]["targets"] == [f"127.0.0.1:{mixer.port}"]
        assert (prom.data_dir).is_dir()

        # the mixer is scraped: its request counter comes back through the query API
        result = _wait("the mixer's requests in Prometheus",
                       lambda: prom.query('sum(hm_mixer_requests_total{job="mixer"})'))
        assert float(result[0]["value"][1]) >= 3
        def health():
            return {t["job"]: t["health"] for t in prom.scrape_targets()}

        # a scrape on this loaded machine can time out now and then: wait for the mixer to be up
        up = _wait("the mixer target up", lambda: (h := health()).get("mixer") == "up" and h)
        assert "prometheus" in up, up
        share = _wait("hm_drift_share from the drift exporter", lambda: prom.query("hm_drift_share"))
        assert float(share[0]["value"][1]) == summary.drift_share == 0.0
        latency = prom.query("histogram_quantile(0.99, sum by (le) (hm_mixer_request_seconds_bucket))")
        assert latency and float(latency[0]["value"][1]) > 0

        # the alert rules are loaded and evaluate without errors
        rules = _wait("the alert rules", lambda: [r for r in prom.alert_rules() if r["health"] == "ok"] and
                      prom.alert_rules())
        assert {r["name"] for r in rules} == ALERTS
        assert all(r["health"] in ("ok", "unknown") for r in rules), rules
    except BaseException:
        print(log_tail(prom.log_file, 40))  # shown with the failure
        raise
    finally:
        pid, port = prom.pid, prom.port
        prom.stop()
        exporter.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert PrometheusServer.find(state) is None
    assert wait_port_free(port, 5.0) and port_is_free(port)
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=1.0)
