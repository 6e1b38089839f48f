"""The drift exporter: the latest drift job's results and the features' freshness as Prometheus gauges.

The drift job (``home-mixer monitor drift``) writes a JSON summary per run under
``<state>/reports/drift/<time>/summary.json``. This exporter reads the newest one at every scrape
(a custom collector: no state kept between scrapes) and exposes:

- ``hm_feature_drift_score{view,feature,method}``: the test's statistic (p-value or distance;
  ``null share``: the absolute change of the null share), ``hm_feature_drifted{view,feature}`` 0/1;
- ``hm_prediction_drift_score{head,method}`` and ``hm_prediction_drifted{head}``;
- ``hm_drift_share`` (drifted features / monitored features) and ``hm_drift_gate`` (its threshold);
- ``hm_drift_gate_passed`` (1 when the run passed the whole gate: the share and no critical fault)
  and ``hm_drift_fault{rule,feature}`` (1 per critical fault: ``missing``, ``nulls``, ``constant``,
  ``scale``, ``stale``, ``category mix``; none when there was none);
- ``hm_drift_summary_timestamp_seconds``: when that drift run was written (to alert on a stale job);
- ``hm_feature_age_seconds``: seconds since the online store was last materialised (wall clock,
  ``StateDir.last_materialization``), and ``hm_feature_materialized_until_seconds``: the event time
  it was filled up to.

Run it with ``home-mixer monitor exporter`` (foreground) or as the ``drift_exporter`` service that
``home-mixer monitor start`` scrapes.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from core.services import ManagedProcess, http_ok
from core.state import PROJECT_ROOT, StateDir
from monitoring.drift import RUNS_DIR, SUMMARY_FILE

def latest_summary(state: StateDir) -> tuple[dict, Path] | None:
    """The newest drift summary of the state folder and its path, or None when there is none."""
    root = state.reports / RUNS_DIR
    if not root.exists():
        return None
    for folder in sorted((p for p in root.iterdir() if p.is_dir()), reverse=True):
        path = folder / SUMMARY_FILE
        try:
            return json.loads(path.read_text()), path
        except (FileNotFoundError, ValueError):
            continue  # a run still writing, or a broken file: the next older one
    return None


class DriftCollector:
    """prometheus_client collector of the gauges of the module docstring for one state folder."""

    def __init__(self, state: StateDir):
        self.state = state

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        found = latest_summary(self.state)
        if found is not None:
            summary, path = found
            feature = GaugeMetricFamily("hm_feature_drift_score", "Drift statistic of a feature in the latest drift run",
                                        labels=["view", "feature", "method"])
            drifted = GaugeMetricFamily("hm_feature_drifted", "1 if the feature drifted in the latest drift run",
                                        labels=["view", "feature"])
            for c in summary.get("features", []):
                if c.get("statistic") is not None:
                    feature.add_metric([c["view"], c["column"], c["method"]], float(c["statistic"]))
                drifted.add_metric([c["view"], c["column"]], float(bool(c["drifted"])))
            prediction = GaugeMetricFamily("hm_prediction_drift_score", "Drift statistic of a head's score",
                                           labels=["head", "method"])
            pred_drifted = GaugeMetricFamily("hm_prediction_drifted", "1 if the head's score drifted", labels=["head"])
            for c in summary.get("predictions", []):
                head = c["column"].removeprefix("score_")
                if c.get("statistic") is not None:
                    prediction.add_metric([head, c["method"]], float(c["statistic"]))
                pred_drifted.add_metric([head], float(bool(c["drifted"])))
            yield from (feature, drifted, prediction, pred_drifted)
            yield GaugeMetricFamily("hm_drift_share", "Share of monitored features drifted in the latest drift run",
                                    value=float(summary.get("drift_share", 0.0)))
            yield GaugeMetricFamily("hm_drift_gate", "The drift job's gate on hm_drift_share",
                                    value=float(summary.get("max_drift_share", 0.0)))
            faults = GaugeMetricFamily("hm_drift_fault", "1 per critical single-feature fault of the latest drift run",
                                       labels=["rule", "feature"])
            for f in summary.get("faults", []):
                faults.add_metric([str(f.get("rule", "?")), str(f.get("column", "?"))], 1.0)
            yield faults
            if "passed" in summary:
                yield GaugeMetricFamily("hm_drift_gate_passed", "1 if the latest drift run passed the whole gate "
                                        "(drift share and no critical fault)", value=float(bool(summary["passed"])))
            yield GaugeMetricFamily("hm_drift_summary_timestamp_seconds", "When the latest drift summary was written",
                                    value=path.stat().st_mtime)
        last = self.state.last_materialization()
        if last is not None:
            yield GaugeMetricFamily("hm_feature_age_seconds", "Seconds since the online store was last materialised",
                                    value=max(time.time() - float(last["materialized_at"]), 0.0))
            yield GaugeMetricFamily("hm_feature_materialized_until_seconds",
                                    "Event time the online store was last filled up to (epoch s)",
                                    value=float(last["until"]))


def exporter_registry(state: StateDir):
    """A fresh ``CollectorRegistry`` holding only the drift collector (no process metrics)."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(DriftCollector(state))
    return registry


def serve(state: StateDir, host: str = "127.0.0.1", port: int = 9464) -> None:
    """Serve ``/metrics`` of the drift collector until interrupted (blocking)."""
    from wsgiref.simple_server import make_server

    from prometheus_client import make_wsgi_app

    with make_server(host, port, make_wsgi_app(exporter_registry(state))) as httpd:
        httpd.serve_forever()


@dataclass
class DriftExporterServer(ManagedProcess):
    """The drift exporter as a background service of a state folder (``run/drift_exporter.json``)."""

    host: str = "127.0.0.1"
    port: int | None = None

    service: ClassVar[str] = "drift_exporter"
    record_fields: ClassVar[tuple[str, ...]] = ("host",)
    cmdline_marker: ClassVar[str] = "monitoring.exporter"
    start_timeout_s: ClassVar[float] = 30.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "monitoring.exporter", "--state", str(self.state.root),
                "--host", self.host, "--port", str(self.port)]

    def cwd(self) -> Path:
        return PROJECT_ROOT

    def ready(self) -> bool:
        """True when ``GET /metrics`` answers 200."""
        return http_ok(f"{self.url}/metrics")

    def status_extra(self) -> dict:
        return {"url": f"{self.url}/metrics"}


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m monitoring.exporter", description=__doc__.splitlines()[0])
    ap.add_argument("--state", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9464)
    args = ap.parse_args(argv)
    serve(StateDir(Path(args.state).resolve()), args.host, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
