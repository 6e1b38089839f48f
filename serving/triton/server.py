"""Start, stop and inspect a real ``tritonserver`` (2.51, from the Triton venv) on loopback ports.

The server runs in explicit model-control mode over the repository that
``serving.triton.repository.sync_repository`` writes (default ``<state>/triton/repository``):
only the rankers named at start are loaded, and :meth:`TritonServer.load` re-reads a model's
``config.pbtxt`` after a sync (new versions served, no restart). HTTP, gRPC and metrics listen on
loopback ports chosen once and recorded in ``<state>/run/triton.json`` with the pid, so another
command (``home-mixer serve triton stop``) can stop it and a restart keeps the addresses. Process
supervision (start with readiness wait, discovery, stop of the process tree) is
``core.services.ManagedProcess``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from core.services import ManagedProcess, ServiceError, log_tail
from core.state import StateDir
from serving.triton.install import TritonInstallation
from serving.triton.repository import RANKERS

PYTHON_SHM_BYTES = 8 * 1024 * 1024  # python-backend shared memory per instance; 16384 x 64 float32 = 4 MiB


def repository_dir(state: StateDir) -> Path:
    """The default model repository of a state folder: ``<state>/triton/repository``."""
    return state.root / "triton" / "repository"


@dataclass
class TritonServer(ManagedProcess):
    """A ``tritonserver`` process serving the rankers of one model repository
    (a ``core.services.ManagedProcess``: record ``<state>/run/triton.json``, ports kept across restarts).

    Args:
        state: state folder (record, log ``<state>/triton/tritonserver.log``).
        repo_dir: model repository (default :func:`repository_dir`).
        models: models loaded at start (default both rankers).
        installation: the Triton install (default ``TritonInstallation.find()``).
        exit_timeout_s: on stop, how long Triton lets in-flight requests (and open keep-alive
            HTTP connections) finish, seconds.

    Attributes set by :meth:`start` / :meth:`running`: ``pid``, ``http_port``, ``grpc_port``,
    ``metrics_port`` (loopback TCP ports; None = the recorded ones if free, else free ones).
    """

    repo_dir: Path | None = None
    models: Sequence[str] = RANKERS
    installation: TritonInstallation | None = None
    exit_timeout_s: int = 3
    http_port: int | None = None
    grpc_port: int | None = None
    metrics_port: int | None = None

    service: ClassVar[str] = "triton"
    port_fields: ClassVar[tuple[str, ...]] = ("http_port", "grpc_port", "metrics_port")
    record_fields: ClassVar[tuple[str, ...]] = ("repo_dir", "models")
    cmdline_marker: ClassVar[str] = "tritonserver"
    start_timeout_s: ClassVar[float] = 60.0

    def __post_init__(self):
        self.repo_dir = Path(self.repo_dir) if self.repo_dir is not None else repository_dir(self.state)
        self.models = tuple(self.models)

    @property
    def repository(self) -> Path:
        """The model repository folder served."""
        return self.repo_dir if self.repo_dir is not None else repository_dir(self.state)

    @property
    def stop_timeout_s(self) -> float:  # type: ignore[override]
        """SIGTERM -> SIGKILL grace: Triton's exit timeout plus 10 s."""
        return self.exit_timeout_s + 10.0

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
    def address(self) -> str:
        return f"grpc {self.grpc_url}, http {self.http_url}, metrics {self.metrics_url}"

    @property
    def log_file(self) -> Path:
        return self.state.root / "triton" / "tritonserver.log"

    def _port(self, attr: str) -> int:
        port = getattr(self, attr)
        if port is None:
            raise ServiceError("Triton is not started: run `home-mixer serve triton start` first.")
        return port

    @contextlib.contextmanager
    def _control(self):
        """A gRPC client for health and model-control calls, closed after the block."""
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(self.grpc_url)
        try:
            yield client
        finally:
            client.close()

    # ------------------------------------------------------------ supervisor hooks

    def prepare(self) -> None:
        """Find the installation and check the repository has every model's ``config.pbtxt``.

        Raises:
            TritonNotInstalledError: the Triton venv is missing (run ``scripts/setup_triton.sh``).
            ServiceError: a model folder or its ``config.pbtxt`` is missing (run
                ``home-mixer serve triton start``, which syncs first, or ``sync_repository``).
        """
        self.installation = self.installation or TritonInstallation.find()
        missing = [m for m in self.models if not (self.repository / m / "config.pbtxt").exists()]
        if missing:
            raise ServiceError(
                f"model repository {self.repository} lacks {missing}: build it with "
                "serving.triton.repository.sync_repository (`home-mixer serve triton start` does it)")

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

    def environment(self) -> dict[str, str]:
        return (self.installation or TritonInstallation.find()).environment()

    def cwd(self) -> Path:
        return self.repository

    def start(self, timeout_s: float | None = None) -> "TritonServer":
        """Start ``tritonserver`` and wait until every model in ``models`` is ready (default 60 s).

        Raises:
            TritonNotInstalledError: the Triton venv is missing (run ``scripts/setup_triton.sh``).
            ServiceError: a model folder or its ``config.pbtxt`` is missing (run
                ``home-mixer serve triton start``, which syncs first, or ``sync_repository``),
                a server is already recorded as running, or the server exited / was not ready within
                ``timeout_s`` seconds (the message quotes the end of its log; nothing is left running).
        """
        return super().start(timeout_s)  # type: ignore[return-value]

    def ready(self) -> bool:
        """The server and every model in ``models`` are ready."""
        try:
            with self._control() as client:
                return client.is_server_ready(client_timeout=1.0) and all(
                    client.is_model_ready(m, client_timeout=1.0) for m in self.models)
        except Exception:  # not listening yet
            return False

    def live(self) -> bool:
        """The server answers its gRPC liveness call."""
        try:
            with self._control() as client:
                return bool(client.is_server_live(client_timeout=2.0))
        except Exception:  # tritonclient raises its own and grpc errors; any means "not answering"
            return False

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
            raise ServiceError(f"Triton could not load {model!r}: {e.message()}\n{log_tail(self.log_file, 10)}") from None
        return self.versions(model)

    def versions(self, model: str) -> list[int]:
        """Versions of ``model`` that are READY, ascending."""
        with self._control() as client:
            index = client.get_model_repository_index(as_json=True, client_timeout=5.0)
        return sorted(int(m["version"]) for m in index.get("models", [])
                      if m.get("name") == model and m.get("state") == "READY" and m.get("version"))

    def status_extra(self) -> dict:
        """``{"http", "grpc", "metrics", "repository", "models": {name: [ready versions]}}``; an
        ``error`` instead of ``models`` if the server does not answer."""
        out = {"http": self.http_url, "grpc": self.grpc_url, "metrics": self.metrics_url,
               "repository": str(self.repository)}
        try:
            out["models"] = {m: self.versions(m) for m in self.models}
        except Exception as e:  # down or unresponsive: say so rather than fail
            out["error"] = str(e)
        return out
