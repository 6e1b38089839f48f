"""The mixer's remote scoring keeps answering when the model server dies mid-run.

Real servers: a ``tritonserver`` (gRPC and HTTP, binary tensors) and ``bentoml serve``, each serving
rankers registered in a real MLflow. A run of scoring calls goes through ``RemoteRankerHandle``
(the mixer's scorer path); the server is SIGKILLed in the middle. Every call must still return
scores: remote before the kill, the in-process fallback of the same version after, equal within
1e-5 to in-process scoring either way, each fallback bounded by the deadline and counted.

With the circuit breaker on (``ModelCircuit``), a server SIGKILLed while calls flow opens it after
``fail_max`` failed calls; from then on no call waits for the server (only one probe per reset
timeout reaches it), and once the server is restarted a probe closes the breaker and the remote
path serves again.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np
import pytest

from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.services import kill_tree
from core.state import StateDir
from mixer.scorers.remote import CIRCUIT_OPEN, FALLBACK, RemoteRankerHandle, make_backend
from tests.dev_frame import build_dev_frame
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import load_ranker
from models.split import split_by_days
from models.train import train_heavy, train_light

pytestmark = pytest.mark.integration

CALLS, KILL_AT, DEADLINE_S = 30, 10, 0.25
FAIL_MAX = 5  # make_backend's default breaker


@pytest.fixture(scope="module")
def registered(data_dir, tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("fallback-state")).ensure()
    train, valid = split_by_days(build_dev_frame(data_dir, user_sample_mod=20), valid_days=2)
    train_light(train, valid, state, params=LightRankerParams(num_threads=1, num_boost_round=30))
    train_heavy(train, valid, state, params=HeavyRankerParams(max_epochs=1, num_threads=1, hidden=(32,), tower=8))
    return state, valid.sample(n=500, random_state=2).reset_index(drop=True)


def _start(kind: str, state: StateDir, rows, sync: bool = True):
    if kind.startswith("triton"):
        from serving.triton.install import TritonInstallation, TritonNotInstalledError
        from serving.triton.repository import sync_repository
        from serving.triton.server import TritonServer, repository_dir

        try:
            TritonInstallation.find()
        except TritonNotInstalledError as e:
            pytest.skip(f"Triton venv not installed: {e}")
        if sync:
            sync_repository(state.mlflow_tracking_uri, repository_dir(state), rows)
        srv = TritonServer(state).start(timeout_s=120)
        return srv, (srv.grpc_url if kind == "triton_grpc" else srv.http_url)
    from serving.bento.server import BentoServer

    srv = BentoServer(state).start(tracking_uri=state.mlflow_tracking_uri)
    return srv, srv.url


@pytest.mark.parametrize("kind", ["triton_grpc", "triton_http", "bentoml"])
def test_every_call_is_answered_when_the_server_is_killed_mid_run(registered, kind):
    state, rows = registered
    srv, url = _start(kind, state, rows)
    fallbacks = []
    try:
        backend = make_backend(kind, url)
        for name in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME):
            local = load_ranker(name, tracking_uri=state.mlflow_tracking_uri)
            # a first call may load the model lazily (seen > 0.25 s on a busy machine): warm up
            # without a tight deadline, since this test is about the server dying, not cold starts
            RemoteRankerHandle(local, backend, kind, 30.0).predict_with_path(rows)
            handle = RemoteRankerHandle(local, backend, kind, DEADLINE_S, on_fallback=lambda *a: fallbacks.append(a))
            expected = local.predict(rows)
            paths, slowest = [], 0.0
            for i in range(CALLS):
                if name == HEAVY_RANKER_NAME and i == KILL_AT:
                    kill_tree(srv.pid)
                started = time.monotonic()
                out, path = handle.predict_with_path(rows)
                slowest = max(slowest, time.monotonic() - started)
                paths.append(path)
                np.testing.assert_allclose(out, expected, atol=1e-5)
            if name == LIGHT_RANKER_NAME:
                assert set(paths) == {kind}, paths  # healthy server: every call remote
            else:
                assert set(paths[:KILL_AT]) == {kind} and set(paths[KILL_AT:]) == {FALLBACK}, paths
                assert slowest < DEADLINE_S * 4 + 1.0  # a dead server costs about one deadline
        assert len(fallbacks) == CALLS - KILL_AT
        # refused, not a deadline; then the breaker opened and the server was no longer called
        assert fallbacks == [(HEAVY_RANKER_NAME, kind, "error")] * FAIL_MAX + \
            [(HEAVY_RANKER_NAME, kind, CIRCUIT_OPEN)] * (CALLS - KILL_AT - FAIL_MAX)
        backend.close()
    finally:
        srv.stop()


BREAKER_FAIL_MAX, BREAKER_RESET_S, BREAKER_DEADLINE_S = 3, 1.0, 0.5


class _CountingBackend:
    """The real backend, counting the calls that reach it (the breakers are the real backend's)."""

    def __init__(self, inner):
        self.inner, self.circuits, self.sent = inner, inner.circuits, 0

    def predict(self, features, model, version, timeout_s):
        self.sent += 1
        return self.inner.predict(features, model, version, timeout_s)


class _Traffic(threading.Thread):
    """Scoring calls as the mixer makes them (light, then heavy), paced, until stopped; records
    (start time, model, path, fallback reason, seconds, server calls before, server calls after)
    per call."""

    def __init__(self, handles, rows, expected, backend):
        super().__init__(daemon=True)
        self.handles, self.rows, self.expected, self.backend = handles, rows, expected, backend
        self.calls, self.reasons, self.errors = [], [], []
        self.stop = threading.Event()

    def run(self):
        try:
            while not self.stop.is_set():
                for h in self.handles:
                    n_reasons, sent, started = len(self.reasons), self.backend.sent, time.monotonic()
                    out, path = h.predict_with_path(self.rows)
                    seconds = time.monotonic() - started
                    np.testing.assert_allclose(out, self.expected[h.name], atol=1e-5)
                    reason = self.reasons[-1][2] if len(self.reasons) > n_reasons else None
                    self.calls.append((started, h.name, path, reason, seconds, sent, self.backend.sent))
                time.sleep(0.02)
        except BaseException as e:  # surfaced by the test
            self.errors.append(e)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.02)


def _signal_tree(pid: int, sig: int) -> None:
    import psutil

    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        proc.send_signal(sig)


@pytest.mark.parametrize("kind, fault", [("bentoml", "kill"), ("triton_grpc", "kill"), ("bentoml", "freeze")])
def test_breaker_skips_a_dead_server_and_closes_when_it_is_back(registered, kind, fault):
    """kill: SIGKILL (calls are refused at once), then a restart on the same ports; freeze:
    SIGSTOP (calls hang until the deadline, the case the breaker is for), then SIGCONT."""
    import signal

    state, rows = registered
    rows = rows.head(200)
    srv, url = _start(kind, state, rows)
    traffic, frozen = None, False
    try:
        backend = _CountingBackend(make_backend(kind, url, fail_max=BREAKER_FAIL_MAX, reset_s=BREAKER_RESET_S))
        circuits, handles, expected = backend.circuits, [], {}
        for name in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME):
            local = load_ranker(name, tracking_uri=state.mlflow_tracking_uri)
            assert RemoteRankerHandle(local, backend, kind, 30.0).predict_with_path(rows)[1] == kind  # warm
            expected[name] = local.predict(rows)
            handles.append(RemoteRankerHandle(local, backend, kind, BREAKER_DEADLINE_S))
        traffic = _Traffic(handles, rows, expected, backend)
        for h in handles:
            h.on_fallback = lambda *a: traffic.reasons.append(a)
        traffic.start()
        _wait(lambda: len(traffic.calls) >= 6, 30, "6 remote calls")
        failed_at = time.monotonic()
        if fault == "kill":
            srv.kill()
        else:
            _signal_tree(srv.pid, signal.SIGSTOP)
            frozen = True
        _wait(lambda: set(circuits.states().values()) == {"open"}, 30, "both breakers open")
        opened_at = time.monotonic()
        time.sleep(3 * BREAKER_RESET_S)  # the server stays down: one probe per reset timeout, failing
        down = [c for c in traffic.calls if c[0] >= opened_at]
        back_started = time.monotonic()
        if fault == "kill":
            srv, url2 = _start(kind, state, rows, sync=False)  # same state folder: the recorded ports again
            assert url2 == url
        else:
            _signal_tree(srv.pid, signal.SIGCONT)
            frozen = False
        back_at = time.monotonic()
        _wait(lambda: set(circuits.states().values()) == {"closed"}, 10 * BREAKER_RESET_S + 30,
              "both breakers closed after the server came back")
        closed_at = time.monotonic()
        _wait(lambda: len([c for c in traffic.calls if c[0] > closed_at]) >= 6, 30, "calls after closing")
        traffic.stop.set()
        traffic.join(30)
        assert not traffic.errors, traffic.errors
        calls = traffic.calls

        before = [c for c in calls if c[0] < failed_at]
        assert {c[2] for c in before} == {kind}
        failed = [c for c in calls if failed_at <= c[0] and c[3] in ("error", "timeout")]
        # refused by a dead server, or hung on a frozen one (a probe may also hang on a restarting
        # server that listens before it is ready: one per reset timeout and model, counted below)
        assert {c[3] for c in failed if c[0] < back_started} == {"error" if fault == "kill" else "timeout"}
        skipped = [c for c in calls if c[3] == CIRCUIT_OPEN]
        # once open, the calls the breaker answers never reach the server, nor wait out the
        # deadline (their time is in-process scoring, slower while the server restarts on 2 cores)
        assert len(skipped) > 20
        assert all(c[5] == c[6] for c in skipped)
        skip_s = [c[4] for c in skipped]
        assert max(skip_s) < BREAKER_DEADLINE_S and statistics.median(skip_s) < BREAKER_DEADLINE_S / 10, skip_s
        # while the server was down and the breaker open, only probes reached it: one per reset
        # timeout and model at most (+1 each for the first one)
        sent_while_open = down[-1][6] - down[0][5]
        span = down[-1][0] - down[0][0]
        assert sent_while_open <= 2 * (span / BREAKER_RESET_S + 1), (sent_while_open, span)
        assert len(failed) <= 2 * BREAKER_FAIL_MAX + 2 * ((closed_at - failed_at) / BREAKER_RESET_S + 1)
        after = [c for c in calls if c[0] > closed_at]
        assert {c[2] for c in after} == {kind}  # the remote path serves again
        waited = [c for c in calls if failed_at <= c[0] and c[4] >= BREAKER_DEADLINE_S * 0.9]
        print(f"\n{kind} {fault}: {len(calls)} calls; down -> both open {opened_at - failed_at:.2f} s; "
              f"{len(failed)} failed calls (max {max(c[4] for c in failed) * 1000:.0f} ms); {len(skipped)} "
              f"circuit_open calls: median {statistics.median(skip_s) * 1000:.1f} ms, max "
              f"{max(skip_s) * 1000:.1f} ms (deadline {BREAKER_DEADLINE_S * 1000:.0f} ms); calls that waited "
              f">= 0.9 deadline: {len(waited)}; server calls while open: {sent_while_open} in {span:.1f} s; "
              f"back in {back_at - back_started:.1f} s, closed {closed_at - back_at:.2f} s later")
        backend.inner.close()
    finally:
        if traffic is not None:
            traffic.stop.set()
        if frozen:
            _signal_tree(srv.pid, signal.SIGCONT)
        srv.stop()
