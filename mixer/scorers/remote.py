"""Scoring on a model server (Triton, BentoML) with a deadline and an in-process fallback.

A ``RemoteRankerHandle`` looks like any ranker handle to the scorers. It sends the feature matrix
(float32 [N, F], columns in the model's ``feature_names`` order, NaN kept) to the server for the
*same registered version* the in-process model has; on any error or after the deadline it scores
in-process instead, so a slow or dead server costs at most ``timeout_s`` per call and never an
answer. Each call reports which path served it (``"triton_grpc"``, ``"in_process_fallback"``, ...).

A circuit breaker (``ModelCircuit``, pybreaker) per (model server client, model) stops paying the
deadline once the server is known dead or hung: after ``fail_max`` consecutive failed calls it opens
and calls go in-process at once (reason ``"circuit_open"``); after ``reset_s`` one probe call goes
to the server, and its success closes the breaker (its failure opens it again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import pandas as pd
import pybreaker

from mixer.scorers.ranker_handle import RankerHandle

log = logging.getLogger(__name__)

IN_PROCESS = "in_process"
FALLBACK = "in_process_fallback"
CIRCUIT_OPEN = "circuit_open"  # fallback reason: the breaker is open, the server was not called
CIRCUIT_STATES = (pybreaker.STATE_CLOSED, pybreaker.STATE_HALF_OPEN, pybreaker.STATE_OPEN)

StateListener = Callable[[str, str, str], None]  # (backend, model, new state)


class CircuitOpenError(RuntimeError):
    """The breaker of a (backend, model) is open, or half-open with its probe in flight: the call
    was not sent to the server."""


class ModelCircuit:
    """The circuit breaker of one model on one model server (a ``pybreaker.CircuitBreaker``).

    pybreaker counts consecutive failures, opens at ``fail_max``, goes half-open and closes on a
    successful probe, and notifies listeners. Its ``CircuitBreaker.call`` is not used around the
    network call because it holds the breaker's lock for the whole call: every scoring call of the
    mixer would queue behind the one in flight (behind a hung server, for up to a deadline each).
    Here the server is called outside any lock: ``attempt()`` admits the call under a short lock,
    and the outcome is then fed to pybreaker's state machine through ``call`` of a function that
    returns or raises it. Half-open admits exactly one probe; the other calls go in-process until
    it answers. An outcome that arrives after the state changed (a call admitted before the
    breaker opened) is ignored, so a late answer cannot close or reopen the breaker by accident.

    Args:
        backend: the backend's name (``"triton_grpc"``, ...), for logs and the listener.
        model: registered model name.
        fail_max: consecutive failures that open the breaker (>= 1).
        reset_s: seconds the breaker stays open before one probe call is let through (> 0).
        on_state_change: called with (backend, model, state) on creation ("closed") and on each
            change; ``state`` is one of ``CIRCUIT_STATES``. Called under the breaker's lock: keep it
            short (a gauge update).
        clock: monotonic seconds, for the reset timeout.

    Raises:
        ValueError: ``fail_max < 1`` or ``reset_s <= 0``.
    """

    def __init__(self, backend: str, model: str, fail_max: int = 5, reset_s: float = 10.0,
                 on_state_change: StateListener | None = None, clock: Callable[[], float] = time.monotonic):
        if fail_max < 1 or not reset_s > 0:
            raise ValueError(f"circuit breaker needs fail_max >= 1 and reset_s > 0, got {fail_max}, {reset_s}")
        self.backend, self.model = backend, model
        self.on_state_change = on_state_change
        self._clock = clock
        self._lock = threading.RLock()  # re-entered by the state listener inside _record
        self._generation = 0  # bumped on every state change; a call's outcome counts only in its own
        self._opened_at = 0.0
        self._probing = False
        self._breaker = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_s,
                                                 name=f"{backend}/{model}", listeners=[_Listener(self)])
        if on_state_change:
            on_state_change(backend, model, self.state)

    @property
    def state(self) -> str:
        """``"closed"``, ``"half-open"`` or ``"open"`` (pybreaker's state names)."""
        return self._breaker.current_state

    def configure(self, fail_max: int, reset_s: float) -> None:
        """New thresholds, from the next call on.

        Raises:
            ValueError: ``fail_max < 1`` or ``reset_s <= 0``.
        """
        if fail_max < 1 or not reset_s > 0:
            raise ValueError(f"circuit breaker needs fail_max >= 1 and reset_s > 0, got {fail_max}, {reset_s}")
        with self._lock:
            self._breaker.fail_max, self._breaker.reset_timeout = int(fail_max), float(reset_s)

    @contextlib.contextmanager
    def attempt(self) -> Iterator[None]:
        """Guard one server call: ``with circuit.attempt(): backend.predict(...)``.

        An exception out of the block counts as a failure (and propagates); a normal exit as a
        success.

        Raises:
            CircuitOpenError: on entry, when the breaker is open (or its probe is in flight); the
                block does not run.
        """
        ticket = self._admit()
        try:
            yield
        except Exception as e:
            self._record(ticket, e)
            raise
        except BaseException:  # Ctrl-C / exit: not the server's fault, but free the probe slot
            self._release(ticket)
            raise
        else:
            self._record(ticket, None)

    def _admit(self) -> int:
        with self._lock:
            state = self._breaker.current_state
            if state == pybreaker.STATE_OPEN:
                waited = self._clock() - self._opened_at
                if waited < self._breaker.reset_timeout:
                    raise CircuitOpenError(f"{self.backend} circuit of {self.model} is open "
                                           f"({self._breaker.reset_timeout - waited:.1f} s to the next probe)")
                self._breaker.half_open()  # the listener bumps the generation
                state = pybreaker.STATE_HALF_OPEN
            if state == pybreaker.STATE_HALF_OPEN:
                if self._probing:
                    raise CircuitOpenError(f"{self.backend} circuit of {self.model} is half-open, probe in flight")
                self._probing = True
            return self._generation

    def _record(self, ticket: int, exc: BaseException | None) -> None:
        with self._lock:
            if ticket != self._generation:
                return  # admitted before the last state change: stale news
            self._probing = False

            def outcome() -> None:
                if exc is not None:
                    raise exc

            tb = exc.__traceback__ if exc is not None else None
            try:
                self._breaker.call(outcome)
            except pybreaker.CircuitBreakerError:
                pass  # this failure opened the breaker (the listener logged it)
            except Exception as e:  # noqa: BLE001 - the call's own error, already handled by the caller
                if e is not exc:
                    raise
            finally:
                if exc is not None:
                    exc.with_traceback(tb)  # raising it again here must not change the caller's traceback

    def _release(self, ticket: int) -> None:
        with self._lock:
            if ticket == self._generation:
                self._probing = False

    def _changed(self, new_state: str) -> None:
        with self._lock:
            self._generation += 1
            self._probing = False
            if new_state == pybreaker.STATE_OPEN:
                self._opened_at = self._clock()
            log_fn = log.warning if new_state == pybreaker.STATE_OPEN else log.info
            log_fn("%s circuit of %s is now %s", self.backend, self.model, new_state)
            if self.on_state_change:
                self.on_state_change(self.backend, self.model, new_state)


class _Listener(pybreaker.CircuitBreakerListener):
    def __init__(self, circuit: ModelCircuit):
        self.circuit = circuit

    def state_change(self, cb, old_state, new_state) -> None:
        self.circuit._changed(new_state.name)


class CircuitBreakers:
    """The breakers of one model server client: one ``ModelCircuit`` per model, made on first use.

    One per (server, model) rather than one per server: failures are often per model (a version not
    loaded, the heavy ranker missing its deadline under load while the light one fits), and a
    shared breaker would cut the healthy model's remote path too. A dead server costs the same
    either way, since each request calls both models: both breakers open after ``fail_max`` requests.

    Args:
        backend: the backend's name (``"triton_grpc"``, ``"triton_http"``, ``"bentoml"``).
        fail_max, reset_s, on_state_change: as in ``ModelCircuit`` (``configure`` changes them).
        clock: monotonic seconds, for the reset timeout (tests move it by hand).

    Raises:
        ValueError: ``fail_max < 1`` or ``reset_s <= 0``.
    """

    def __init__(self, backend: str, fail_max: int = 5, reset_s: float = 10.0,
                 on_state_change: StateListener | None = None, clock: Callable[[], float] = time.monotonic):
        self.backend = backend
        self._clock = clock
        self._lock = threading.Lock()
        self._circuits: dict[str, ModelCircuit] = {}
        self.configure(fail_max, reset_s, on_state_change)

    def configure(self, fail_max: int, reset_s: float, on_state_change: StateListener | None = None) -> None:
        """Thresholds and listener of every breaker, current and future (the mixer calls it on each
        model load, so it must be idempotent). The listener is told each breaker's current state.

        Raises:
            ValueError: ``fail_max < 1`` or ``reset_s <= 0``.
        """
        if fail_max < 1 or not reset_s > 0:
            raise ValueError(f"circuit breaker needs fail_max >= 1 and reset_s > 0, got {fail_max}, {reset_s}")
        with self._lock:
            self.fail_max, self.reset_s, self.on_state_change = int(fail_max), float(reset_s), on_state_change
            for circuit in self._circuits.values():
                circuit.configure(self.fail_max, self.reset_s)
                circuit.on_state_change = on_state_change
                if on_state_change:
                    on_state_change(self.backend, circuit.model, circuit.state)

    def for_model(self, model: str) -> ModelCircuit:
        """The breaker of ``model`` (made closed on first use)."""
        circuit = self._circuits.get(model)
        if circuit is None:
            with self._lock:
                circuit = self._circuits.get(model)
                if circuit is None:
                    circuit = self._circuits[model] = ModelCircuit(self.backend, model, self.fail_max, self.reset_s,
                                                                   self.on_state_change, self._clock)
        return circuit

    def states(self) -> dict[str, str]:
        """``{model: state}`` of the breakers made so far."""
        with self._lock:
            return {m: c.state for m, c in self._circuits.items()}


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
        on_fallback: called with (model name, path, reason) each time the fallback serves; reason is
            ``"timeout"``, ``"error"`` or ``"circuit_open"``.

    The circuit breaker is the backend's (``backend.circuits``, a ``CircuitBreakers``, when it has
    one), so it outlives the handles a model reload replaces.
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
        circuits = getattr(self.backend, "circuits", None)
        return remote_or_local(
            lambda: self.backend.predict(x, self.name, int(self.version), self.timeout_s),
            lambda: self.local.predict(frame), (len(frame), len(self.heads)),
            name=self.name, version=self.version, path=self.path, what="scoring",
            circuit=circuits.for_model(self.name) if circuits is not None else None, on_fallback=self.on_fallback)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        return self.predict_with_path(frame)[0]


def fallback_reason(exc: BaseException) -> str:
    """``"circuit_open"`` when the breaker kept the call from the server, ``"timeout"`` when the
    server missed the deadline, else ``"error"``.

    Decided by type along the exception's cause chain: ``TimeoutError`` (the Triton client raises it
    for its own deadline), BentoML's ``BentoTimeout``, or gRPC's ``DEADLINE_EXCEEDED`` status
    (carried in ``TritonUnavailable.reason``).
    """
    if isinstance(exc, CircuitOpenError):
        return CIRCUIT_OPEN
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError) or type(seen).__name__ == "BentoTimeout":
            return "timeout"
        reason = str(getattr(seen, "reason", ""))
        if "DEADLINE_EXCEEDED" in reason or reason.startswith("TimeoutError"):
            return "timeout"
        seen = seen.__cause__
    return "error"


def remote_or_local(remote: Callable[[], np.ndarray], local: Callable[[], np.ndarray], shape: tuple[int, int], *,
                    name: str, version, path: str, what: str, circuit=None,
                    on_fallback: Callable[[str, str, str], None] | None = None) -> tuple[np.ndarray, str]:
    """``remote()`` through the model's circuit breaker, checked to be float32 ``shape``; on any
    failure ``local()`` instead: a slow or dead server costs at most its deadline, never an answer.

    Args:
        remote / local: the server call and the in-process call of the same model version.
        shape: the expected output shape (a wrong one counts as a failure of the server).
        name, version, path: for the logs and ``on_fallback``; what: the work, for the logs
            ("scoring", "embedding").
        circuit: the model's breaker (``ModelCircuit``) or None.
        on_fallback: called with (model name, path, reason); reason ``"timeout"``, ``"error"`` or
            ``"circuit_open"``.

    Returns:
        (float32 output, ``path`` or ``FALLBACK``).
    """
    guard = circuit.attempt() if circuit is not None else contextlib.nullcontext()
    try:
        with guard:  # a wrong shape counts as a failure of the server too
            out = np.asarray(remote(), dtype=np.float32)
            if out.shape != tuple(shape):
                raise ValueError(f"server returned shape {out.shape}, expected {tuple(shape)}")
        return out, path
    except Exception as e:  # noqa: BLE001 - any server failure falls back, never fails the request
        reason = fallback_reason(e)
        if reason == CIRCUIT_OPEN:  # every call while open: the state change was logged once
            log.debug("%s v%s on %s: circuit open; %s in-process", name, version, path, what)
        else:
            log.warning("%s v%s on %s failed (%s: %r); %s in-process", name, version, path, reason, e, what)
        if on_fallback:
            on_fallback(name, path, reason)
        return np.asarray(local(), dtype=np.float32), FALLBACK


def predict_with_path(handle, frame: pd.DataFrame) -> tuple[np.ndarray, str]:
    """``handle.predict_with_path`` when it has one (remote handles), else in-process ``predict``."""
    if hasattr(handle, "predict_with_path"):
        return handle.predict_with_path(frame)
    return handle.predict(frame), IN_PROCESS


class TritonBackend:
    """``RemoteBackend`` over ``serving.triton.client.TritonRankerClient`` (binary tensors).

    Args:
        url: ``host:port`` of Triton's gRPC (protocol "grpc") or HTTP (protocol "http") endpoint.
        circuits: the breakers of this server (default: ``CircuitBreakers("triton_<protocol>")``).
    """

    def __init__(self, url: str, protocol: str, circuits: CircuitBreakers | None = None):
        from serving.triton.client import TritonRankerClient

        self.circuits = circuits or CircuitBreakers(f"triton_{protocol}")

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
    """``RemoteBackend`` over ``serving.bento.client.BentoRankerClient`` (binary float32 bodies).

    Args:
        url: ``http://host:port`` of the BentoML server.
        circuits: the breakers of this server (default: ``CircuitBreakers("bentoml")``).
    """

    def __init__(self, url: str, circuits: CircuitBreakers | None = None):
        from serving.bento.client import BentoRankerClient

        self.circuits = circuits or CircuitBreakers("bentoml")
        self._client = BentoRankerClient(url)

    def predict(self, features: np.ndarray, model: str, version: int, timeout_s: float) -> np.ndarray:
        return self._client.predict(features, model=model, version=version, timeout_s=timeout_s)

    def close(self) -> None:
        self._client.close()


def make_backend(backend: str, url: str, fail_max: int = 5, reset_s: float = 10.0) -> RemoteBackend:
    """The client for ``scoring.backend`` (``triton_grpc``, ``triton_http`` or ``bentoml``), with a
    circuit breaker per model (``fail_max``, ``reset_s``: ``CircuitBreakers``; ``.circuits``).

    Raises:
        ValueError: another backend name, ``fail_max < 1`` or ``reset_s <= 0``.
    """
    if backend not in ("triton_grpc", "triton_http", "bentoml"):
        raise ValueError(f"unknown scoring backend {backend!r}: use triton_grpc, triton_http or bentoml")
    circuits = CircuitBreakers(backend, fail_max, reset_s)
    if backend == "bentoml":
        return BentoBackend(url, circuits)
    return TritonBackend(url, backend.removeprefix("triton_"), circuits)
