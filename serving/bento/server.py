"""Start, stop and inspect the BentoML ranker server as a child process on a loopback port.

``bentoml serve serving.bento.service:HomeMixerRankers`` runs in its own session (process group)
with its log in ``<state>/run/bentoml.log``; its pid and port are written to ``<state>/run/`` so
another command (``home-mixer serve bentoml stop``) can find and stop it. BentoML's home folder
(``BENTOML_HOME``) is ``<state>/bentoml`` so nothing is written outside the state folder, and
BentoML's usage tracking is off (``BENTOML_DO_NOT_TRACK``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from core.services import ServiceError, child_pids, free_port, pid_alive, stop_pid
from core.state import PROJECT_ROOT, StateDir
from serving.bento.protocol import MODELS_ROUTE, READY_ROUTE

SERVICE_TARGET = "serving.bento.service:HomeMixerRankers"
HOST = "127.0.0.1"


def _log_tail(path: Path, lines: int = 15) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class BentoServer:
    """The BentoML ranker server of one state folder.

    Attributes:
        state: the state folder (MLflow store, ``run/`` for pid, port and log).
        port: TCP port on 127.0.0.1 (a free one is picked at start when None).
        pid: process id of ``bentoml serve`` once started or found running.
    """

    state: StateDir
    port: int | None = None
    pid: int | None = None

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
    def log_path(self) -> Path:
        return self.state.run / "bentoml.log"

    def _files(self) -> tuple[Path, Path]:
        return self.state.run / "bentoml.pid", self.state.run / "bentoml.port"

    @staticmethod
    def _is_ours(pid: int) -> bool:
        """The pid is alive and is a ``bentoml serve`` of this service (not a recycled pid)."""
        cmdline = Path(f"/proc/{pid}/cmdline")
        try:
            raw = cmdline.read_bytes()
        except OSError:
            return pid_alive(pid) and not cmdline.parent.exists()  # no /proc: trust liveness
        return b"bentoml" in raw and SERVICE_TARGET.encode() in raw

    @classmethod
    def running(cls, state: StateDir) -> "BentoServer | None":
        """The server recorded in ``state/run`` if its process is alive (ready or still starting)."""
        srv = cls(state)
        pid_file, port_file = srv._files()
        if not (pid_file.exists() and port_file.exists()):
            return None
        try:
            srv.pid, srv.port = int(pid_file.read_text()), int(port_file.read_text())
        except ValueError:
            return None
        return srv if cls._is_ours(srv.pid) else None

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

    def start(self, timeout_s: float = 120.0, tracking_uri: str | None = None,
              models: tuple[str, ...] | None = None) -> "BentoServer":
        """Start ``bentoml serve`` and wait until ``/readyz`` answers 200.

        Args:
            timeout_s: seconds to wait for readiness (start-up imports torch and MLflow, then
                loads each champion: ~10 s here).
            tracking_uri: MLflow registry (default ``state.mlflow_tracking_uri``).
            models: model names to serve (default: both rankers).

        Raises:
            ServiceError: a server of this state folder is already running, the process exited,
                a served model's champion could not be loaded (the message has the load errors),
                or it was not ready within ``timeout_s`` (the message has the log's last lines);
                the process is stopped in each case.
        """
        existing = self.running(self.state)
        if existing is not None:
            raise ServiceError(f"a BentoML server is already running at {existing.url} (pid {existing.pid}); "
                               "stop it with `home-mixer serve bentoml stop`")
        self.state.ensure()
        self.port = self.port or free_port()
        env = dict(os.environ)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # BentoML sets up its own multiprocess metrics
        env.update({
            "MLFLOW_TRACKING_URI": tracking_uri or self.state.mlflow_tracking_uri,
            "HOME_MIXER_STATE": str(self.state.root),
            "BENTOML_HOME": str(self.state.root / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
        })
        if models:
            env["HOME_MIXER_BENTO_MODELS"] = ",".join(models)
        cmd = [sys.executable, "-m", "bentoml", "serve", SERVICE_TARGET, "--host", HOST, "--port", str(self.port),
               "--working-dir", str(PROJECT_ROOT)]
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=PROJECT_ROOT,
                                    start_new_session=True)
        self.pid = proc.pid
        pid_file, port_file = self._files()
        pid_file.write_text(str(self.pid))
        port_file.write_text(str(self.port))
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if proc.poll() is not None:
                self._forget()
                raise ServiceError(f"bentoml serve exited with code {proc.returncode}; last lines of "
                                   f"{self.log_path}:\n{_log_tail(self.log_path)}")
            # the service answers but a champion failed to load (e.g. not trained yet): say so now
            # rather than after the timeout
            errors = self._load_errors()
            if errors or time.monotonic() > deadline:
                self.stop()
                raise ServiceError(
                    "the BentoML server could not load "
                    + "; ".join(f"{name} ({err})" for name, err in errors.items())
                    + "; train and register the rankers first (`home-mixer train`)" if errors else
                    f"the BentoML server was not ready within {timeout_s:.0f} s; last lines of "
                    f"{self.log_path}:\n{_log_tail(self.log_path)}")
            time.sleep(0.2)
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the server (BentoML stops its workers), SIGKILL it after ``timeout_s`` seconds,
        then SIGKILL any of its workers still alive, and remove the pid and port files.

        Workers run in sessions of their own, so they are found as the server's child processes
        (recorded before signalling) rather than by process group.
        """
        if self.pid is not None and self._is_ours(self.pid):
            workers = child_pids(self.pid)
            stop_pid(self.pid, timeout_s)
            for pid in workers:
                if self._is_ours(pid):  # still the same worker, not a recycled pid
                    stop_pid(pid, timeout_s=2.0)
        self._forget()

    def _forget(self) -> None:
        for f in self._files():
            f.unlink(missing_ok=True)
        self.pid = None

    def status(self) -> dict:
        """``{"running": bool, "ready": bool, "url": str | None, "pid": int | None, "log": str}``."""
        running = self.running(self.state)
        return {
            "running": running is not None,
            "ready": running.ready() if running else False,
            "url": running.url if running else None,
            "pid": running.pid if running else None,
            "log": str(self.log_path),
        }
