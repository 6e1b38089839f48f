"""Scoring on a model server (Triton, BentoML) with a deadline and an in-process fallback.

A ``RemoteRankerHandle`` looks like any ranker handle to the scorers. It sends the feature matrix
(float32 [N, F], columns in the model's ``feature_names`` order, NaN kept) to the server for the
*same registered version* the in-process model has; on any error or after the deadline it scores
in-process instead, so a slow or dead server costs at most ``timeout_s`` per call and never an
answer. Each call reports which path served it (``"triton_grpc"``, ``"in_process_fallback"``, ...).
"""

from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence

import numpy as np
import pandas as pd

from mixer.scorers.ranker_handle import RankerHandle

log = logging.getLogger(__name__)

IN_PROCESS = "in_process"
FALLBACK = "in_process_fallback"


class RemoteBackend(Protocol):
    """A model server client: ``predict(features float32 [N, F], model, version, timeout_s)`` ->
    float32 [N, H]; raises on error or deadline."""

    def predict(self, features: np.ndarray, model: str, version: int, timeout_s: float) -> np.ndarray: ...


class RemoteRankerHandle:
    """A ranker handle that scores on ``backend`` and falls back to ``local`` (same version).

    Args:
        local: the in-process handle (``models.registry.load_ranker``); its name, version,
            feature names and heads are the remote model's too.
        backend: the server client (``TritonBackend``, ``BentoBackend``).
        path: name of the remote path reported per call, e.g. ``"triton_grpc"``.
        timeout_s: deadline of one remote call, seconds.
        on_fallback: called with (model name, path, reason) each time the fallback serves.
    """

    def __init__(self, local: RankerHandle, backend: RemoteBackend, path: str, timeout_s: float,
                 on_fallback: Callable[[str, str, str], None] | None = None):
        self.local = local
        self.backend = backend
        self.path = path
        self.timeout_s = timeout_s
        self.on_fallback = on_fallback

    @property
    def name(self) -> str:
        return str(getattr(self.local, "name", ""))

    @property
    def version(self):
        return self.local.version

    @property
    def feature_names(self) -> Sequence[str]:
        return self.local.feature_names

    @property
    def heads(self) -> Sequence[str]:
        return self.local.heads

    def predict_with_path(self, frame: pd.DataFrame) -> tuple[np.ndarray, str]:
        """Probabilities float32 [len(frame), len(heads)] and the path that produced them."""
        x = frame[list(self.feature_names)].to_numpy(dtype=np.float32)
        try:
            out = np.asarray(self.backend.predict(x, self.name, int(self.version), self.timeout_s), dtype=np.float32)
            if out.shape != (len(frame), len(self.heads)):
                raise ValueError(f"server returned shape {out.shape}, expected ({len(frame)}, {len(self.heads)})")
            return out, self.path
        except Exception as e:  # noqa: BLE001 - any server failure falls back, never fails the request
            reason = fallback_reason(e)
            log.warning("%s v%s on %s failed (%s: %r); scoring in-process", self.name, self.version,
                        self.path, reason, e)
            if self.on_fallback:
                self.on_fallback(self.name, self.path, reason)
            return np.asarray(self.local.predict(frame), dtype=np.float32), FALLBACK

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.predict_with_path(frame)[0]


def fallback_reason(exc: BaseException) -> str:
    """``"timeout"`` when the server missed the deadline, else ``"error"``.

    Decided by type along the exception's cause chain: ``TimeoutError`` (the Triton client raises it
    for its own deadline), BentoML's ``BentoTimeout``, or gRPC's ``DEADLINE_EXCEEDED`` status
    (carried in ``TritonUnavailable.reason``).
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or type(seen).__name__ == "BentoTimeout":
            return "timeout"
        reason = str(getattr(seen, "reason", ""))
        if "DEADLINE_EXCEEDED" in reason or reason.startswith("TimeoutError"):
            return "timeout"
        seen = seen.__cause__
    return "error"


def predict_with_path(handle, frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """``handle.predict_with_path`` when it has one (remote handles), else in-process ``predict``."""
    if hasattr(handle, "predict_with_path"):
        return handle.predict_with_path(frame)
    return handle.predict(frame), IN_PROCESS


class TritonBackend:
    """``RemoteBackend`` over ``serving.triton.client.TritonRankerClient`` (binary tensors).

    Args:
        url: ``host:port`` of Triton's gRPC (protocol "grpc") or HTTP (protocol "http") endpoint.
    """

    def __init__(self, url: str, protocol: str):
        import threading

        from serving.triton.client import TritonRankerClient

        self._lock = threading.Lock()
        self._clients: dict[str, TritonRankerClient] = {}
        self._factory = lambda model: TritonRankerClient(url, model, protocol=protocol)

    def predict(self, features: np.ndarray, model: str, version: int, timeout_s: float) -> np.ndarray:
        client = self._clients.get(model)
        if client is None:
            with self._lock:  # one client (channel / pool) per model, even under concurrent first calls
                client = self._clients.get(model)
                if client is None:
                    client = self._clients[model] = self._factory(model)
        return client.predict(features, version=version, timeout_s=timeout_s)

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


class BentoBackend:
    """``RemoteBackend`` over ``serving.bento.client.BentoRankerClient`` (binary float32 bodies)."""

    def __init__(self, url: str):
        from serving.bento.client import BentoRankerClient

        self._client = BentoRankerClient(url)

    def predict(self, features: np.ndarray, model: str, version: int, timeout_s: float) -> np.ndarray:
        return self._client.predict(features, model=model, version=version, timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()


def make_backend(backend: str, url: str) -> RemoteBackend:
    """The client for ``scoring.backend`` (``triton_grpc``, ``triton_http`` or ``bentoml``).

    Raises:
        ValueError: another backend name.
    """
    if backend == "triton_grpc":
        return TritonBackend(url, "grpc")
    if backend == "triton_http":
        return TritonBackend(url, "http")
    if backend == "bentoml":
        return BentoBackend(url)
    raise ValueError(f"unknown scoring backend {backend!r}: use triton_grpc, triton_http or bentoml")
