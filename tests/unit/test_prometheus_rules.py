"""The Prometheus alert rules (monitoring/prometheus/alerts.yml) are valid and pass their promtool
unit tests (alerts_test.yml: series that fire each alert and series that do not)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from core.state import PROJECT_ROOT

RULES_DIR = PROJECT_ROOT / "monitoring" / "prometheus"
ALERTS = ("HomeMixerDriftShareHigh", "HomeMixerDriftFault", "HomeMixerFeaturesStale", "HomeMixerStreamLagHigh", "HomeMixerFanoutLagHigh",
          "HomeMixerLatencyP99High", "HomeMixerScoringFallbackRateHigh", "HomeMixerSourceFailureRateHigh")

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool not on PATH: install Debian's prometheus (scripts/setup.sh does it)")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promtool, *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alert_rules_pass_promtool_check():
    res = _promtool("check", "rules", "alerts.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in res.stdout


@needs_promtool
def test_alert_rules_pass_their_promtool_unit_tests():
    res = _promtool("test", "rules", "alerts_test.yml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_for_severity_and_what_to_check():
    rules = [r for g in yaml.safe_load((RULES_DIR / "alerts.yml").read_text())["groups"] for r in g["rules"]]
    assert sorted(r["alert"] for r in rules) == sorted(ALERTS)
    for r in rules:
        assert r.get("for"), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and "Check" in r["annotations"]["description"], r["alert"]


def test_every_alert_fires_and_stays_quiet_in_the_promtool_tests():
    tests = yaml.safe_load((RULES_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    quiet = {c["alertname"] for t in tests for c in t["alert_rule_test"] if not c["exp_alerts"]}
    assert fired == set(ALERTS) and quiet == set(ALERTS)


def test_alerts_use_the_metric_names_the_services_export():
    from mixer.metrics import MixerMetrics
    from pipelines.graph.metrics import FanoutMetrics
    from pipelines.streaming.metrics import StreamMetrics

    text = (RULES_DIR / "alerts.yml").read_text()
    exported = set()
    for metrics in (MixerMetrics(), StreamMetrics(), FanoutMetrics()):
        for family in metrics.registry.collect():
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
            if family.type == "histogram":
                exported.add(family.name + "_bucket")
    used = set(re.findall(r"\bhm_(?:mixer|stream|fanout)_[a-z0-9_]+", text))
    assert used and used <= exported, used - exported
