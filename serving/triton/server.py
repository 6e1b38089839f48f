"""Start, stop and inspect a real ``tritonserver`` (2.51, from the Triton venv) on loopback ports.

The server runs in explicit model-control mode over the repository that
``serving.triton.repository.sync_repository`` writes (default ``<state>/triton/repository``):
only the rankers named at start are loaded, and :meth:`TritonServer.load` re-reads a model's
``config.pbtxt`` after a sync (new versions served, no restart). HTTP, gRPC and metrics listen on
free ports of 127.0.0.1; pid and ports are recorded in ``<state>/run/triton.json`` so another
command (``home-mixer serve triton stop``) can stop it by pid.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from core.services import ServiceError, free_port, pid_alive, stop_pid
from core.state import StateDir
from serving.triton.install import TritonInstallation
from serving.triton.repository import RANKERS

PYTHON_SHM_BYTES = 8 * 1024 * 1024  # python-backend shared memory per instance; 16384 x 64 float32 = 4 MiB


def repository_dir(state: StateDir) -> Path:
    """The default model repository of a state folder: ``<state>/triton/repository``."""
    return state.root / "triton" / "repository"


@dataclass
class TritonServer:
    """A ``tritonserver`` process serving the rankers of one model repository.

    Args:
        state: state folder (pid/ports file, log ``<state>/triton/tritonserver.log``).
        repo_dir: model repository (default :func:`repository_dir`).
        models: models loaded at start (default both rankers).
        installation: the Triton install (default ``TritonInstallation.find()``).
        exit_timeout_s: on stop, how long Triton lets in-flight requests (and open keep-alive
            HTTP connections) finish, seconds.

    Attributes set by :meth:`start` / :meth:`running`: ``pid``, ``http_port``, ``grpc_port``,
    ``metrics_port``.
    """

    state: StateDir
    repo_dir: Path | None = None
    models: Sequence[str] = RANKERS
    installation: TritonInstallation | None = None
    exit_timeout_s: int = 3
    pid: int | None = None
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None
    started_seconds: float | None = field(default=None, compare=False)

    def __post_init__(self):
        self.repo_dir = Path(self.repo_dir) if self.repo_dir is not None else repository_dir(self.state)
        self.models = tuple(self.models)

    @property
    def repository(self) -> Path:
        """The model repository folder served."""
        return self.repo_dir if self.repo_dir is not None else repository_dir(self.state)

    # ------------------------------------------------------------ addresses and files

    @property
    def http_url(self) -> str:
        """``127.0.0.1:<port>`` of the HTTP endpoint (tritonclient.http form, no scheme)."""
        return f"127.0.0.1:{self._port('http_port')}"

    @property
    def grpc_url(self) -> str:
        """``127.0.0.1:<port>`` of the gRPC endpoint."""
        return f"127.0.0.1:{self._port('grpc_port')}"

    @property
    def metrics_url(self) -> str:
        """``http://127.0.0.1:<port>/metrics`` (Prometheus text)."""
        return f"http://127.0.0.1:{self._port('metrics_port')}/metrics"

    @property
    def log_file(self) -> Path:
        return self.state.root / "triton" / "tritonserver.log"

    def _port(self, attr: str) -> int:
        port = getattr(self, attr)
        if port is None:
            raise ServiceError("Triton is not started: run `home-mixer serve triton start` first.")
        return port

    @staticmethod
    def _record_file(state: StateDir) -> Path:
        return state.run / "triton.json"

    @contextlib.contextmanager
    def _control(self):
        """A gRPC client for health and model-control calls, closed after the block."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            yield client
        finally:
            client.close()

    # ------------------------------------------------------------ lifecycle

    @classmethod
    def running(cls, state: StateDir) -> "TritonServer | None":
        """The server recorded in ``state`` if its process is alive (a ``tritonserver``) and live."""
        record = cls._record_file(state)
        if not record.exists():
            return None
        info = json.loads(record.read_text())
        srv = cls(state, repo_dir=Path(info["repo_dir"]), models=tuple(info["models"]), pid=info["pid"],
                  http_port=info["http_port"], grpc_port=info["grpc_port"], metrics_port=info["metrics_port"])
        cmdline = Path(f"/proc/{info['pid']}/cmdline")
        if not pid_alive(int(info["pid"])) or not cmdline.exists() or b"tritonserver" not in cmdline.read_bytes():
            return None  # a recycled pid is not ours
        try:
            with srv._control() as client:
                if not client.is_server_live(client_timeout=2.0):
                    return None
        except Exception:  # tritonclient raises its own and grpc errors; any means "not answering"
            return None
        return srv

    def command(self) -> list[str]:
        """The ``tritonserver`` command line (ports must be set)."""
        inst = self.installation or TritonInstallation.find()
        cmd = [
            str(inst.tritonserver),
            f"--model-repository={self.repository}",
            "--model-control-mode=explicit",
            *(f"--load-model={m}" for m in self.models),
            f"--backend-directory={inst.backend_directory}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_BYTES}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",  # CPU only: no CUDA pinned pool (and no warning)
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",  # in-flight requests get this long on stop
            "--log-verbose=0",
        ]
        return cmd

    def start(self, timeout_s: float = 60.0) -> "TritonServer":
        """Start ``tritonserver`` and wait until every model in ``models`` is ready.

        Raises:
            TritonNotInstalledError: the Triton venv is missing (run ``scripts/setup_triton.sh``).
            ServiceError: a model folder or its ``config.pbtxt`` is missing (run
                ``home-mixer serve triton start``, which syncs first, or ``sync_repository``),
                a server is already recorded as running, or the server exited / was not ready within
                ``timeout_s`` seconds (the message quotes the end of its log).
        """
        installation = self.installation = self.installation or TritonInstallation.find()
        missing = [m for m in self.models if not (self.repository / m / "config.pbtxt").exists()]
        if missing:
            raise ServiceError(
                f"model repository {self.repository} lacks {missing}: build it with "
                "serving.triton.repository.sync_repository (`home-mixer serve triton start` does it)")
        if TritonServer.running(self.state):
            raise ServiceError(f"a Triton server is already running for {self.state.root}: "
                               "`home-mixer serve triton stop` first")
        self.state.ensure()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.http_port, self.grpc_port, self.metrics_port = free_port(), free_port(), free_port()
        if len({self.http_port, self.grpc_port, self.metrics_port}) < 3:
            self.grpc_port, self.metrics_port = free_port(), free_port()
        started = time.monotonic()
        with open(self.log_file, "ab") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=installation.environment(), cwd=self.repository,
                                    start_new_session=True)
        self.pid = proc.pid
        deadline = started + timeout_s
        try:
            while True:
                if proc.poll() is not None:
                    self.pid = None
                    raise ServiceError(f"tritonserver exited with code {proc.returncode} while starting:\n"
                                       f"{self._log_tail()}\n(full log: {self.log_file})")
                if self._ready():
                    break
                if time.monotonic() > deadline:
                    raise ServiceError(f"tritonserver was not ready within {timeout_s:.0f} s:\n"
                                       f"{self._log_tail()}\n(full log: {self.log_file})")
                time.sleep(0.1)
        except BaseException:  # timeout, Ctrl-C, anything: never leave an unrecorded server behind
            if self.pid is not None:
                self.stop()
            raise
        self.started_seconds = time.monotonic() - started
        self._record_file(self.state).write_text(json.dumps({
            "pid": self.pid, "http_port": self.http_port, "grpc_port": self.grpc_port,
            "metrics_port": self.metrics_port, "repo_dir": str(self.repository), "models": list(self.models),
        }))
        return self

    def _ready(self) -> bool:
        try:
            with self._control() as client:
                return client.is_server_ready(client_timeout=1.0) and all(
                    client.is_model_ready(m, client_timeout=1.0) for m in self.models)
        except Exception:  # not listening yet
            return False

    def _log_tail(self, lines: int = 25) -> str:
        if not self.log_file.exists():
            return "(no log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """Stop the server by pid (SIGTERM; SIGKILL if still alive 10 s after its exit timeout)."""
        if self.pid is not None:
            stop_pid(self.pid, timeout_s=self.exit_timeout_s + 10.0)
        record = self._record_file(self.state)
        if record.exists() and json.loads(record.read_text()).get("pid") in (self.pid, None):
            record.unlink()
        self.pid = None

    # ------------------------------------------------------------ models

    def load(self, model: str, timeout_s: float = 60.0) -> list[int]:
        """(Re)load ``model`` after its repository folder changed; returns the ready versions.

        Triton re-reads ``config.pbtxt``: versions added to ``version_policy`` are loaded, versions
        no longer listed are unloaded, and requests keep being served meanwhile.

        Raises:
            ServiceError: the load failed (Triton's reason in the message) or the server is down.
        """
        from tritonclient.utils import InferenceServerException

        try:
            with self._control() as client:
                client.load_model(model, client_timeout=timeout_s)
        except InferenceServerException as e:
            raise ServiceError(f"Triton could not load {model!r}: {e.message()}\n{self._log_tail(10)}") from None
        return self.versions(model)

    def versions(self, model: str) -> list[int]:
        """Versions of ``model`` that are READY, ascending."""
        with self._control() as client:
            index = client.get_model_repository_index(as_json=True, client_timeout=5.0)
        return sorted(int(m["version"]) for m in index.get("models", [])
                      if m.get("name") == model and m.get("state") == "READY" and m.get("version"))

    def status(self) -> dict:
        """``{"running", "pid", "http", "grpc", "metrics", "repository", "models": {name: [ready versions]}}``."""
        if self.pid is None:
            return {"running": False}
        try:
            models = {m: self.versions(m) for m in self.models}
        except Exception as e:  # down or unresponsive: say so rather than fail
            return {"running": False, "pid": self.pid, "error": str(e)}
        return {"running": True, "pid": self.pid, "http": self.http_url, "grpc": self.grpc_url,
                "metrics": self.metrics_url, "repository": str(self.repository), "models": models}
