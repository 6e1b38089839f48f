"""Debian's Prometheus for one state folder: scrape config generated from the run records, alert rules loaded.

``PrometheusServer(state).start()`` writes ``<state>/prometheus/prometheus.yml`` and runs
``prometheus --config.file ... --storage.tsdb.path <state>/prometheus/data --web.listen-address
127.0.0.1:<port>`` in its own session, waits for ``GET /-/ready`` = 200, and records pid, start time
and port in ``<state>/run/prometheus.json`` (log in ``<state>/prometheus/prometheus.log``).
Supervision is ``core.services.ManagedProcess``; the CLI is ``home-mixer monitor start|stop|status``.

What it scrapes (every ``scrape_interval_s`` seconds, default 5), one job each, found through the
run records of the state folder (``<state>/run/*.json``, written by the services when they start):

- ``mixer``: every mixer of the state folder (records of service ``mixer``: ``MixerServer``), ``/metrics``;
- ``stream_processor``: every stream processor serving metrics (``home-mixer stream run
  --metrics-port``: records ``run/stream_processor-<consumer>.json`` of service ``stream_processor``
  with ``ports.metrics_port``, ``pipelines.streaming.metrics.record_metrics_endpoint``);
- ``fanout_worker``: every fan-out worker serving metrics (``home-mixer fanout run --metrics-port``:
  ``run/fanout_worker-<consumer>.json``, ``pipelines.graph.metrics``);
- ``drift_exporter``: the drift exporter (``run/drift_exporter.json``), if recorded;
- ``haproxy``: every mixer front door (``home-mixer serve mixer --replicas N``: records of service
  ``haproxy``, ``mixer.haproxy.HAProxyServer``), HAProxy's built-in exporter at
  ``<stats_port>/metrics`` (queue, retries, redispatches, server states); its replicas are
  ``mixer`` records and are scraped one by one by the ``mixer`` job;
- ``prometheus``: itself.

The targets live in file-SD files (``<state>/prometheus/targets/<job>.json``) that Prometheus
re-reads within seconds, so :meth:`PrometheusServer.write_targets` (run by ``start``, and by
``home-mixer monitor start`` while it runs) picks up services started after it without a restart.
A target whose service is stopped stays listed: it shows as ``up == 0``.

The alert rules are ``monitoring/prometheus/alerts.yml`` (tested with ``promtool test rules``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import yaml

from core.services import ManagedProcess, ServiceError, http_ok
from core.state import PROJECT_ROOT, StateDir
from mixer.auth import state_token_path

RULES_DIR = PROJECT_ROOT / "monitoring" / "prometheus"
ALERT_RULES = RULES_DIR / "alerts.yml"

# job name -> the run-record ``service`` it scrapes, and the port fields to try in order
SCRAPE_JOBS: dict[str, tuple[str, tuple[str, ...]]] = {
    "mixer": ("mixer", ("port",)),
    "stream_processor": ("stream_processor", ("metrics_port", "port")),
    "fanout_worker": ("fanout_worker", ("metrics_port",)),
    "drift_exporter": ("drift_exporter", ("port",)),
    "haproxy": ("haproxy", ("stats_port",)),
}


def recorded_targets(state: StateDir, service: str, port_fields: tuple[str, ...] = ("port",)) -> list[dict]:
    """``[{"name", "address"}]`` of every run record of ``service`` in ``state.run`` that holds a port.

    A record is ``run/<name>.json`` as ``ManagedProcess`` writes it (``{"service", "ports": {...},
    "fields": {"host": ...}}``); records of other services, without a port, or unreadable are skipped.
    The process need not be running (Prometheus then shows the target down).
    """
    out = []
    for path in sorted(state.run.glob("*.json")) if state.run.exists() else []:
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("service") != service:
            continue
        ports = info.get("ports") or {}
        port = next((ports[f] for f in port_fields if ports.get(f)), None)
        if port is None:
            continue
        host = (info.get("fields") or {}).get("host") or "127.0.0.1"
        host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        out.append({"name": path.stem, "address": f"{host}:{int(port)}"})
    return out


@dataclass
class PrometheusServer(ManagedProcess):
    """Debian's ``prometheus`` for one state folder (see the module docstring).

    Attributes:
        port: TCP port on 127.0.0.1 (None: the recorded one if free, else a free one, at start).
        scrape_interval_s: scrape and rule-evaluation interval (seconds).
        retention: TSDB retention (``--storage.tsdb.retention.time``).
    """

    port: int | None = None
    scrape_interval_s: float = 5.0
    retention: str = "7d"

    service: ClassVar[str] = "prometheus"
    record_fields: ClassVar[tuple[str, ...]] = ("scrape_interval_s", "retention")
    cmdline_marker: ClassVar[str] = "prometheus"
    start_timeout_s: ClassVar[float] = 60.0
    stop_timeout_s: ClassVar[float] = 20.0  # it flushes the head block on SIGTERM

    # ------------------------------------------------------------ paths

    @property
    def home(self) -> Path:
        """``<state>/prometheus``: config, file-SD targets, data, log."""
        return self.state.root / "prometheus"

    @property
    def config_file(self) -> Path:
        return self.home / "prometheus.yml"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def targets_dir(self) -> Path:
        return self.home / "targets"

    @property
    def log_file(self) -> Path:
        return self.home / "prometheus.log"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``.

        Raises:
            ServiceError: not started or found.
        """
        if self.port is None:
            raise ServiceError("Prometheus is not started: run `home-mixer monitor start` first")
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        return self.url

    # ------------------------------------------------------------ config

    def targets(self) -> dict[str, list[dict]]:
        """``{job: [{"name", "address"}]}`` from the state folder's run records (Prometheus itself
        included once its port is chosen)."""
        out = {job: recorded_targets(self.state, service, fields) for job, (service, fields) in SCRAPE_JOBS.items()}
        out["prometheus"] = [{"name": "prometheus", "address": f"127.0.0.1:{self.port}"}] if self.port else []
        return out

    def write_targets(self) -> dict[str, list[dict]]:
        """(Re)write the file-SD target files from the run records; returns :meth:`targets`.

        Prometheus watches these files: a running server picks up the change within seconds.
        """
        self.targets_dir.mkdir(parents=True, exist_ok=True)
        targets = self.targets()
        for job, found in targets.items():
            groups = [{"targets": [t["address"]], "labels": {"service": t["name"]}} for t in found]
            path = self.targets_dir / f"{job}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(groups, indent=1) + "\n")
            os.replace(tmp, path)  # atomic: Prometheus never reads half a file
        return targets

    def config(self) -> dict[str, Any]:
        """The ``prometheus.yml`` content (one file-SD job per scraped service, the alert rules)."""
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        jobs = [{
            "job_name": job,
            "metrics_path": "/metrics",
            "file_sd_configs": [{"files": [str(self.targets_dir / f"{job}.json")], "refresh_interval": interval}],
        } for job in (*SCRAPE_JOBS, "prometheus")]
        # the mixer's /metrics may need a token (auth.protect_metrics): Prometheus reads the state
        # folder's token file at each scrape, so the token never enters prometheus.yml or a log
        for job in jobs:
            if job["job_name"] == "mixer":
                job["authorization"] = {"type": "Bearer", "credentials_file": str(state_token_path(self.state))}
        return {
            "global": {"scrape_interval": interval, "evaluation_interval": interval,
                       "scrape_timeout": f"{int(min(self.scrape_interval_s, 10.0) * 1000)}ms",
                       "external_labels": {"state": str(self.state.root)}},
            "rule_files": [str(ALERT_RULES)],
            "scrape_configs": jobs,
        }

    def write_config(self) -> Path:
        """Write ``prometheus.yml`` and the target files into ``<state>/prometheus``; returns the config path."""
        self.home.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.write_targets()
        self.config_file.write_text(
            "# generated by home-mixer (monitoring/prometheus_server.py) at every `home-mixer monitor start`\n"
            + yaml.safe_dump(self.config(), sort_keys=False))
        return self.config_file

    # ------------------------------------------------------------ ManagedProcess

    def prepare(self) -> None:
        """Raises ServiceError if ``prometheus`` is not installed or the alert rules are missing."""
        if shutil.which("prometheus") is None:
            raise ServiceError("prometheus not found on PATH. Install Debian's package with "
                               "`apt-get install -y prometheus` (scripts/setup.sh does this).")
        if not ALERT_RULES.exists():
            raise ServiceError(f"alert rules {ALERT_RULES} are missing from the checkout")

    def command(self) -> list[str]:
        self.write_config()  # ports are chosen when this is called
        return [shutil.which("prometheus") or "prometheus",
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.data_dir}",
                f"--storage.tsdb.retention.time={self.retention}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle"]

    def cwd(self) -> Path:
        return self.home

    def ready(self) -> bool:
        """True when ``GET /-/ready`` answers 200 (TSDB open, config and rules loaded)."""
        return http_ok(f"{self.url}/-/ready")

    def live(self) -> bool:
        """True when ``GET /-/healthy`` answers 200."""
        return http_ok(f"{self.url}/-/healthy")

    def start(self, timeout_s: float | None = None) -> "PrometheusServer":
        """Write the config, start Prometheus and wait for ``/-/ready`` (default 60 s).

        Raises:
            ServiceError: ``prometheus`` is not installed, one already runs for the state folder, the
                port is in use, or it exited / was not ready in time (the message has the end of
                ``<state>/prometheus/prometheus.log``; nothing is left running).
        """
        return super().start(timeout_s)  # type: ignore[return-value]

    # ------------------------------------------------------------ HTTP API

    def api(self, path: str, **params) -> Any:
        """``GET /api/v1/<path>`` -> its ``data``.

        Raises:
            ServiceError: Prometheus does not answer or answers an error.
        """
        try:
            r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=5.0)
            body = r.json()
        except (httpx.HTTPError, ValueError) as e:
            raise ServiceError(f"Prometheus at {self.url} did not answer /api/v1/{path}: {e}") from None
        if body.get("status") != "success":
            raise ServiceError(f"Prometheus /api/v1/{path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """Instant query: the ``result`` list of ``/api/v1/query``."""
        return self.api("query", query=promql)["result"]

    def scrape_targets(self) -> list[dict]:
        """``[{"job", "url", "health", "last_error"}]`` of the active targets (``/api/v1/targets``)."""
        return [{"job": t["labels"].get("job"), "url": t.get("scrapeUrl"), "health": t.get("health"),
                 "last_error": t.get("lastError") or None}
                for t in self.api("targets", state="active")["activeTargets"]]

    def alert_rules(self) -> list[dict]:
        """``[{"name", "state", "health"}]`` of the loaded alerting rules (``/api/v1/rules``)."""
        return [{"name": r["name"], "state": r.get("state"), "health": r.get("health")}
                for g in self.api("rules", type="alert")["groups"] for r in g["rules"]]

    def status_extra(self) -> dict:
        """``{"url", "config", "targets", "alerts"}`` (targets and firing/pending alerts from the API)."""
        out: dict[str, Any] = {"url": self.url, "config": str(self.config_file)}
        try:
            out["targets"] = self.scrape_targets()
            out["alerts"] = [{"name": a["labels"].get("alertname"), "state": a.get("state")}
                             for a in self.api("alerts")["alerts"]]
        except ServiceError as e:
            out["error"] = str(e)
        return out
