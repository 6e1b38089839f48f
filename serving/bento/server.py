"""The BentoML ranker server as a supervised child process on a loopback port.

``bentoml serve serving.bento.service:HomeMixerRankers`` runs in its own session (process group)
with its log in ``<state>/run/bentoml.log``; its pid, start time and port are recorded in
``<state>/run/bentoml.json`` so another command (``home-mixer serve bentoml stop``) can find and
stop it, and a restart keeps the port. Supervision (readiness wait, discovery, stop of the process
tree including the workers, which run in sessions of their own) is ``core.services.ManagedProcess``.
BentoML's home folder (``BENTOML_HOME``) is ``<state>/bentoml`` so nothing is written outside the
state folder, and BentoML's usage tracking is off (``BENTOML_DO_NOT_TRACK``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx

from core.services import ManagedProcess, ServiceError
from core.state import PROJECT_ROOT
from serving.bento.protocol import MODELS_ROUTE, READY_ROUTE

SERVICE_TARGET = "serving.bento.service:HomeMixerRankers"
HOST = "127.0.0.1"


@dataclass
class BentoServer(ManagedProcess):
    """The BentoML ranker server of one state folder.

    Attributes:
        state: the state folder (MLflow store, ``run/`` for the record and the log).
        port: TCP port on 127.0.0.1 (None: the recorded one if free, else a free one, at start).
        pid: process id of ``bentoml serve`` once started or found running.
        tracking_uri: MLflow registry served (None: ``state.mlflow_tracking_uri``).
        models: model names served (None: both rankers).
    """

    port: int | None = None
    tracking_uri: str | None = None
    models: tuple[str, ...] | None = None

    service: ClassVar[str] = "bentoml"
    record_fields: ClassVar[tuple[str, ...]] = ("tracking_uri", "models")
    cmdline_marker: ClassVar[str] = SERVICE_TARGET
    start_timeout_s: ClassVar[float] = 120.0
    stop_timeout_s: ClassVar[float] = 15.0

    def __post_init__(self):
        self.models = tuple(self.models) if self.models else None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``.

        Raises:
            ServiceError: the server was not started or found.
        """
        if self.port is None:
            raise ServiceError("the BentoML server is not started: run `home-mixer serve bentoml start` first")
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        return self.url

    @property
    def log_file(self) -> Path:
        return self.state.run / "bentoml.log"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", HOST, "--port", str(self.port),
                "--working-dir", str(PROJECT_ROOT)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # BentoML sets up its own multiprocess metrics
        env.update({
            "MLFLOW_TRACKING_URI": self.tracking_uri or self.state.mlflow_tracking_uri,
            "HOME_MIXER_STATE": str(self.state.root),
            "BENTOML_HOME": str(self.state.root / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
        })
        if self.models:
            env["HOME_MIXER_BENTO_MODELS"] = ",".join(self.models)
        return env

    def cwd(self) -> Path:
        return PROJECT_ROOT

    def ready(self, timeout_s: float = 1.0) -> bool:
        """True if ``GET /readyz`` answers 200 (every served model has its champion loaded)."""
        try:
            return httpx.get(self.url + READY_ROUTE, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False

    def _load_errors(self) -> dict:
        try:
            info = httpx.post(self.url + MODELS_ROUTE, timeout=2.0).json()
            return {n: m["load_error"] for n, m in info["models"].items() if m.get("load_error")}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return {}

    def start_failure(self) -> str | None:
        """The service answers but a champion failed to load (e.g. not trained yet): say so now
        rather than after the timeout."""
        errors = self._load_errors()
        if not errors:
            return None
        return ("the BentoML server could not load " + "; ".join(f"{name} ({err})" for name, err in errors.items())
                + "; train and register the rankers first (`home-mixer train`)")

    def start(self, timeout_s: float | None = None, tracking_uri: str | None = None,
              models: tuple[str, ...] | None = None) -> "BentoServer":
        """Start ``bentoml serve`` and wait until ``/readyz`` answers 200.

        Args:
            timeout_s: seconds to wait for readiness (default 120; start-up imports torch and
                MLflow, then loads each champion: ~10 s here).
            tracking_uri: MLflow registry (default ``self.tracking_uri``, else
                ``state.mlflow_tracking_uri``).
            models: model names to serve (default ``self.models``, else both rankers).

        Raises:
            ServiceError: a server of this state folder is already running, the port is in use,
                the process exited, a served model's champion could not be loaded (the message has
                the load errors), or it was not ready within ``timeout_s`` (the message has the
                log's last lines); the process tree is stopped in each case.
        """
        if tracking_uri is not None:
            self.tracking_uri = tracking_uri
        if models:
            self.models = tuple(models)
        return super().start(timeout_s)  # type: ignore[return-value]

    def status_extra(self) -> dict:
        """``{"url": "http://127.0.0.1:<port>"}``."""
        return {"url": self.url}
