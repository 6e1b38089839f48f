"""The mixer API (``python -m mixer.api``) as a supervised child process on a loopback port.

``MixerServer(state).start()`` runs uvicorn in its own session, waits for ``GET /healthz`` = 200,
and records pid, start time and port in ``<state>/run/<name>.json`` (default name ``mixer``), with
its log in ``<state>/run/<name>.log``. Supervision is ``core.services.ManagedProcess``; the CLI is
``home-mixer serve mixer start|stop|status`` (``home-mixer serve mixer`` alone runs it in the
foreground).
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
    """

    name: str = "mixer"
    host: str = "127.0.0.1"
    port: int | None = None
    config: Path | None = None
    redis_url: str | None = None
    tracking_uri: str | None = None

    service: ClassVar[str] = "mixer"
    record_fields: ClassVar[tuple[str, ...]] = ("host", "config")
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
    def address(self) -> str:
        return f"{self.url} (OpenAPI at {self.url}/docs)"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "mixer.api", "--host", self.host, "--port", str(self.port)]
        if self.config:
            cmd += ["--config", str(self.config)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = {**os.environ, "HOME_MIXER_STATE": str(self.state.root), "PYTHONUNBUFFERED": "1",
               "MLFLOW_TRACKING_URI": self.tracking_uri or self.state.mlflow_tracking_uri}
        if self.redis_url:
            env["HOME_MIXER_REDIS_URL"] = self.redis_url
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
