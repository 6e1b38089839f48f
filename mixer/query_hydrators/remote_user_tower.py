"""The two-tower user tower on Triton, with the in-process tower as its fallback
(``candidate_sources.embedding.user_tower: triton``), as ``mixer.scorers.remote`` does for the rankers."""

from __future__ import annotations

from typing import Callable

import numpy as np

from mixer.scorers.remote import ModelCircuit, remote_or_local

TRITON_PATH = "triton_grpc"


class RemoteUserTowerHandle:
    """A two-tower handle (``models.registry.TwoTowerHandle``'s interface) whose ``user_embeddings``
    asks Triton for the *same registered version* the in-process handle holds, and runs the
    in-process tower instead on any error or after the deadline, so a slow or dead server costs at
    most ``timeout_s`` per request and never an answer. The catalogue side (index, candidate
    embeddings, candidate tower) stays in-process: it is what the mixer searches.

    Both paths start from ``TwoTowerFit.user_tower_inputs`` (one id lookup and padding), so they
    see the same tensors.

    Args:
        local: the in-process ``TwoTowerHandle`` (its name, version and vocabularies are the served
            model's).
        client: ``serving.triton.client.TritonUserTowerClient`` of the Triton model (named as the
            registered model).
        timeout_s: deadline of one Triton call, seconds.
        circuit: the breaker of this model on this server (``mixer.scorers.remote.ModelCircuit``),
            shared by the handles a model reload replaces; None: no breaker.
        on_fallback: called with (model name, path, reason) each time the in-process tower serves;
            reason is ``"timeout"``, ``"error"`` or ``"circuit_open"``.

    Attribute ``last_path``: which path served the latest call (``"triton_grpc"`` or
    ``"in_process_fallback"``; per handle, for tests and logs, not per request).
    """

    def __init__(self, local, client, timeout_s: float, circuit: ModelCircuit | None = None,
                 on_fallback: Callable[[str, str, str], None] | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.local = local
        self.client = client
        self.timeout_s = timeout_s
        self.circuit = circuit
        self.on_fallback = on_fallback
        self.last_path = ""

    # the served model's identity and catalogue: the in-process handle's
    name = property(lambda self: self.local.name)
    alias = property(lambda self: self.local.alias)
    version = property(lambda self: self.local.version)
    run_id = property(lambda self: self.local.run_id)
    model = property(lambda self: self.local.model)
    index = property(lambda self: self.local.index)
    item_ids = property(lambda self: self.local.item_ids)
    item_vectors = property(lambda self: self.local.item_vectors)
    dim = property(lambda self: self.local.dim)

    def search(self, user_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The in-process ANN index (``TwoTowerHandle.search``)."""
        return self.local.search(user_vectors, k)

    def retrieve(self, sequences, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``search(user_embeddings(sequences), k)``."""
        return self.search(self.user_embeddings(sequences), k)

    def user_embeddings(self, sequences) -> np.ndarray:
        """User vectors float32 ``[B, D]`` (unit rows) from Triton, or in-process on failure.

        Raises:
            ValueError: a malformed sequence (non-integer ids): the request's own fault, not the
                server's, so it is raised rather than retried in-process.
        """
        inputs = self.local.model.user_tower_inputs(sequences)  # raises ValueError before any call
        if inputs.batch == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        out, self.last_path = remote_or_local(
            lambda: self.client.embed(inputs, version=int(self.version), timeout_s=self.timeout_s),
            lambda: self.local.model.user_vectors(inputs), (inputs.batch, self.dim),
            name=self.name, version=self.version, path=TRITON_PATH, what="embedding", circuit=self.circuit,
            on_fallback=self.on_fallback)
        return out


class TritonUserTower:
    """The mixer's Triton user-tower client and its circuit breaker, one per mixer process; each
    loaded two-tower version is wrapped by :meth:`wrap` (a reload wraps the new version with the
    same client and breaker).

    Args:
        url: Triton's gRPC ``host:port``.
        model_name: the Triton model = the registered two-tower model's name.
        timeout_s: deadline of one call, seconds.
        circuits: the breakers (``mixer.scorers.remote.CircuitBreakers``, backend ``triton_grpc``).
    """

    def __init__(self, url: str, model_name: str, timeout_s: float, circuits):
        from serving.triton.client import TritonUserTowerClient

        self.client = TritonUserTowerClient(url, model_name, protocol="grpc", timeout_s=timeout_s)
        self.timeout_s = timeout_s
        self.circuits = circuits

    def wrap(self, local, on_fallback: Callable[[str, str, str], None] | None = None) -> RemoteUserTowerHandle:
        """``local`` (a ``TwoTowerHandle``) with its user tower on Triton."""
        return RemoteUserTowerHandle(local, self.client, self.timeout_s, self.circuits.for_model(local.name),
                                     on_fallback)

    def close(self) -> None:
        self.client.close()
