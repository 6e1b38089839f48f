"""The mixer API (``python -m mixer.api``) as a supervised child process on a loopback port.

``MixerServer(state).start()`` runs uvicorn in its own session, waits for ``GET /healthz`` = 200,
and records pid, start time and port in ``<state>/run/<name>.json`` (default name ``mixer``), with
its log in ``<state>/run/<name>.log``. Supervision is ``core.services.ManagedProcess``; the CLI is
``home-mixer serve mixer start|stop|status`` (``home-mixer serve mixer`` alone runs it in the
foreground).
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import httpx

from core import METRICS_DIR_ENV
from core.services import ManagedProcess, ServiceError
from core.state import PROJECT_ROOT


@dataclass
class MixerServer(ManagedProcess):
    """One mixer API process of a state folder.

    Attributes:
        name: record and log name in ``run/`` (several mixers of one state folder need distinct names).
        host: listen address (default 127.0.0.1).
        port: TCP port (None: the recorded one if free, else a free one, at start).
        config: mixer YAML merged over the embedded ``mixer/mixer.yaml`` (None: the embedded one).
        redis_url: ``HOME_MIXER_REDIS_URL`` of the process (None: inherited / the config's).
        tracking_uri: ``MLFLOW_TRACKING_URI`` of the process (None: ``state.mlflow_tracking_uri``).
        workers: worker processes behind the port (``python -m mixer.api --workers``); with more
            than one, their metrics are summed through ``run/<name>.metrics/`` (emptied at start).
    """

    name: str = "mixer"
    host: str = "127.0.0.1"
    port: int | None = None
    config: Path | None = None
    redis_url: str | None = None
    tracking_uri: str | None = None
    workers: int = 1

    service: ClassVar[str] = "mixer"
    record_fields: ClassVar[tuple[str, ...]] = ("host", "config", "workers")
    cmdline_marker: ClassVar[str] = "mixer.api"
    start_timeout_s: ClassVar[float] = 120.0

    def __post_init__(self):
        self.config = Path(self.config) if self.config else None

    @property
    def record_name(self) -> str:
        return self.name

    def _find_kwargs(self) -> dict:
        return {"name": self.name}

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` (loopback when listening on all addresses).

        Raises:
            ServiceError: not started or found.
        """
        if self.port is None:
            raise ServiceError(f"the mixer {self.name!r} is not started: run `home-mixer serve mixer start` first")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def token(self) -> str:
        """The bearer token its clients send (``mixer.auth.client_token``: the first of
        ``$HOME_MIXER_API_TOKENS``, else the state folder's ``run/mixer-api-token``).

        Raises:
            mixer.auth.AuthConfigError: an unusable token in the environment or an unsafe token file.
        """
        from mixer.auth import client_token

        return client_token(self.state)

    @property
    def auth_headers(self) -> dict[str, str]:
        """``{"Authorization": "Bearer <token>"}`` for requests to this mixer."""
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def address(self) -> str:
        return f"{self.url} (OpenAPI at {self.url}/docs)"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mixer.api", "--host", self.host, "--port", str(self.port)]
        if self.config:
            cmd += ["--config", str(self.config)]
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    @property
    def metrics_dir(self) -> Path:
        """``run/<name>.metrics``: the worker processes' metric files."""
        return self.state.run / f"{self.name}.metrics"

    def prepare(self) -> None:
        """Empty the workers' metrics folder: files of an earlier run's processes would add to ours."""
        super().prepare()
        if self.workers > 1:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            self.metrics_dir.mkdir(parents=True)

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "HOME_MIXER_STATE": str(self.state.root), "PYTHONUNBUFFERED": "1",
               "MLFLOW_TRACKING_URI": self.tracking_uri or self.state.mlflow_tracking_uri}
        if self.redis_url:
            env["HOME_MIXER_REDIS_URL"] = self.redis_url
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # a leftover (feast sets it) would make metrics file-backed
        env.pop(METRICS_DIR_ENV, None)
        if self.workers > 1:
            env[METRICS_DIR_ENV] = str(self.metrics_dir)
        return env

    def cwd(self) -> Path:
        return PROJECT_ROOT

    def ready(self) -> bool:
        """True when ``GET /healthz`` answers 200 (models loaded, Redis answering)."""
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self, timeout_s: float | None = None) -> "MixerServer":
        """Start the mixer and wait for ``/healthz`` (default 120 s: it loads both rankers).

        Raises:
            ServiceError: a mixer of this name is already running for the state folder, the port
                is in use, or it exited / was not healthy within ``timeout_s`` (the message has
                the end of ``run/<name>.log``; nothing is left running).
        """
        return super().start(timeout_s)  # type: ignore[return-value]

    def status_extra(self) -> dict:
        """``{"url": ..., "config": ...}``."""
        return {"url": self.url, "config": str(self.config) if self.config else None}
