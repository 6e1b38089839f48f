"""RemoteRankerHandle (deadline + in-process fallback) and ModelAliasWatcher (swap on alias move)."""

import time

import numpy as np
import pandas as pd
import pytest

from mixer.metrics import MixerMetrics
from mixer.model_watcher import ModelAliasWatcher
from mixer.scorers.remote import FALLBACK, RemoteRankerHandle, predict_with_path


class LocalHandle:
    name = "light_ranker"

    def __init__(self, version=3, offset=0.0):
        self.version, self.offset = version, offset
        self.feature_names = ("a", "b")
        self.heads = ("engaged",)

    def predict(self, frame):
        return (frame["a"].to_numpy(dtype=np.float32) + self.offset).reshape(-1, 1)


class Backend:
    def __init__(self, mode="ok", delay_s=0.0):
        self.mode, self.delay_s, self.calls = mode, delay_s, []

    def predict(self, features, model, version, timeout_s):
        self.calls.append((features.copy(), model, version, timeout_s))
        if self.mode == "error":
            raise ConnectionError("server down")
        if self.delay_s > timeout_s:
            time.sleep(timeout_s)
            raise TimeoutError("deadline exceeded")
        if self.mode == "bad_shape":
            return np.zeros((1, 5), dtype=np.float32)
        return features[:, :1] * 10


FRAME = pd.DataFrame({"b": [1.0, 2.0], "a": [0.5, np.nan], "extra": [9, 9]})


def test_remote_path_sends_model_columns_in_order_with_nan_and_the_version():
    backend = Backend()
    handle = RemoteRankerHandle(LocalHandle(version=3), backend, "triton_grpc", 0.05)
    out, path = handle.predict_with_path(FRAME)
    assert path == "triton_grpc"
    sent, model, version, timeout = backend.calls[0]
    assert sent.dtype == np.float32 and sent.shape == (2, 2)
    assert sent[0].tolist() == [0.5, 1.0] and np.isnan(sent[1, 0])  # column order a, b; NaN kept
    assert (model, version, timeout) == ("light_ranker", 3, 0.05)
    assert out[0, 0] == pytest.approx(5.0)


@pytest.mark.parametrize("backend, reason", [
    (Backend("error"), "error"), (Backend(delay_s=1.0), "timeout"), (Backend("bad_shape"), "error"),
])
def test_failures_fall_back_in_process_and_are_reported(backend, reason):
    seen = []
    handle = RemoteRankerHandle(LocalHandle(offset=1.0), backend, "bentoml", 0.02,
                                on_fallback=lambda *a: seen.append(a))
    started = time.monotonic()
    out, path = handle.predict_with_path(FRAME)
    assert time.monotonic() - started < 0.5  # bounded by the deadline, not the server
    assert path == FALLBACK
    np.testing.assert_allclose(out[:, 0], [1.5, np.nan])  # the local model's answer
    assert seen == [("light_ranker", "bentoml", reason)]


def test_plain_handles_report_in_process():
    _, path = predict_with_path(LocalHandle(), FRAME)
    assert path == "in_process"


class FakePipeline:
    def __init__(self):
        self.model_versions = {"light_ranker": "1", "heavy_ranker": "1"}
        self.swaps = []

    def swap_rankers(self, light, heavy):
        if light == "broken":
            raise ValueError("heads differ")
        self.swaps.append((light, heavy))
        self.model_versions = {"light_ranker": str(light), "heavy_ranker": str(heavy)}


def test_watcher_swaps_only_when_an_alias_moves_and_keeps_serving_on_failure():
    pipe, metrics = FakePipeline(), MixerMetrics()
    wanted = {"light_ranker": 1, "heavy_ranker": 1}
    loads = []

    def load():
        loads.append(dict(wanted))
        return ("broken", 0) if wanted["light_ranker"] == 9 else (wanted["light_ranker"], wanted["heavy_ranker"])

    after = []
    w = ModelAliasWatcher(pipe, lambda: dict(wanted), load, 60, metrics, after_swap=lambda: after.append(1))
    assert w.check_once() is False and loads == []  # nothing moved: no load
    wanted["heavy_ranker"] = 2
    assert w.check_once() is True and pipe.model_versions == {"light_ranker": "1", "heavy_ranker": "2"}
    assert after == [1]  # the hook ran once, after the swap
    wanted["light_ranker"] = 9  # a version that cannot be served
    assert w.check_once() is False and pipe.model_versions["light_ranker"] == "1" and after == [1]
    n_loads = len(loads)
    assert w.check_once() is False and len(loads) == n_loads  # not retried until the alias moves again
    wanted["light_ranker"] = 4
    assert w.check_once() is True and pipe.model_versions["light_ranker"] == "4"
    text = metrics.render().decode()
    assert 'hm_mixer_model_reloads_total{model="heavy_ranker",outcome="swapped"} 1.0' in text
    assert 'hm_mixer_model_reloads_total{model="light_ranker",outcome="failed"} 1.0' in text


def test_watcher_survives_registry_errors():
    def boom():
        raise RuntimeError("registry down")

    pipe = FakePipeline()
    assert ModelAliasWatcher(pipe, boom, lambda: (1, 1), 60, MixerMetrics()).check_once() is False
    assert pipe.swaps == []


def test_fallback_reason_is_decided_by_the_error_type():
    from mixer.scorers.remote import fallback_reason
    from serving.bento.client import BentoTimeout, BentoUnavailable
    from serving.triton.client import TritonUnavailable

    assert fallback_reason(TimeoutError("slow")) == "timeout"
    assert fallback_reason(BentoTimeout("no answer within 0.1 s")) == "timeout"
    assert fallback_reason(BentoUnavailable("connection refused")) == "error"
    assert fallback_reason(TritonUnavailable("grpc://x", "heavy_ranker", 2, "InferenceServerException: "
                                             "Deadline Exceeded (StatusCode.DEADLINE_EXCEEDED)")) == "timeout"
    assert fallback_reason(TritonUnavailable("grpc://x", "heavy_ranker", 2, "failed to connect")) == "error"
    assert fallback_reason(ValueError("timeout in the message is not a deadline")) == "error"


# ---- circuit breaker (one per backend client and model; mixer.scorers.remote.ModelCircuit) ----

class Clock:
    """A monotonic clock the test moves by hand (the breaker's reset timeout)."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class BreakingBackend(Backend):
    """A fake server client with the backend's breakers, as ``make_backend`` builds them."""

    def __init__(self, mode="ok", delay_s=0.0, fail_max=3, reset_s=10.0, clock=None):
        from mixer.scorers.remote import CircuitBreakers

        super().__init__(mode, delay_s)
        self.clock = clock or Clock()
        self.states = []
        self.circuits = CircuitBreakers("bentoml", fail_max, reset_s, lambda *a: self.states.append(a), self.clock)


DEADLINE_S = 0.2


def _calls(handle, n):
    """n calls: (path, seconds) of each."""
    out = []
    for _ in range(n):
        started = time.monotonic()
        _, path = handle.predict_with_path(FRAME)
        out.append((path, time.monotonic() - started))
    return out


@pytest.mark.parametrize("mode, delay_s, reason", [("error", 0.0, "error"), ("ok", 1.0, "timeout")])
def test_breaker_opens_after_fail_max_and_skips_the_server(mode, delay_s, reason):
    backend = BreakingBackend(mode, delay_s, fail_max=3)
    seen = []
    handle = RemoteRankerHandle(LocalHandle(offset=1.0), backend, "bentoml", DEADLINE_S,
                                on_fallback=lambda *a: seen.append(a))
    first = _calls(handle, 3)
    assert len(backend.calls) == 3 and {p for p, _ in first} == {FALLBACK}
    assert backend.circuits.states() == {"light_ranker": "open"}
    then = _calls(handle, 20)
    assert len(backend.calls) == 3  # open: the server is not called any more
    assert {p for p, _ in then} == {FALLBACK}
    assert max(s for _, s in then) < DEADLINE_S / 10  # in-process at once, not after the deadline
    out, _ = handle.predict_with_path(FRAME)
    np.testing.assert_allclose(out[:, 0], [1.5, np.nan])  # still the local model's answer
    assert seen[:3] == [("light_ranker", "bentoml", reason)] * 3
    assert set(seen[3:]) == {("light_ranker", "bentoml", "circuit_open")}
    assert backend.states == [("bentoml", "light_ranker", "closed"), ("bentoml", "light_ranker", "open")]


def test_a_success_before_fail_max_resets_the_count():
    backend = BreakingBackend("error", fail_max=3)
    handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", DEADLINE_S)
    _calls(handle, 2)
    backend.mode = "ok"
    assert _calls(handle, 1)[0][0] == "bentoml"
    backend.mode = "error"
    _calls(handle, 2)
    assert backend.circuits.states() == {"light_ranker": "closed"}  # 2 + 2 failures, never 3 in a row


def test_after_the_reset_timeout_a_successful_probe_closes_the_breaker():
    backend = BreakingBackend("error", fail_max=2, reset_s=10.0)
    handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", DEADLINE_S)
    _calls(handle, 2)
    backend.mode = "ok"  # the server is back, but the breaker does not know yet
    backend.clock.t += 9.9
    assert _calls(handle, 1)[0][0] == FALLBACK and len(backend.calls) == 2
    backend.clock.t += 0.2  # reset timeout passed: one probe goes to the server
    assert _calls(handle, 1)[0][0] == "bentoml" and len(backend.calls) == 3
    assert backend.circuits.states() == {"light_ranker": "closed"}
    assert [p for p, _ in _calls(handle, 5)] == ["bentoml"] * 5
    assert [s for *_, s in backend.states] == ["closed", "open", "half-open", "closed"]


def test_a_failed_probe_opens_the_breaker_again_for_another_reset_timeout():
    backend = BreakingBackend("error", fail_max=2, reset_s=10.0)
    handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", DEADLINE_S)
    _calls(handle, 2)
    backend.clock.t += 10.1
    assert _calls(handle, 1)[0][0] == FALLBACK and len(backend.calls) == 3  # the probe failed
    assert backend.circuits.states() == {"light_ranker": "open"}
    backend.mode = "ok"
    backend.clock.t += 5.0  # a new reset timeout started at the failed probe
    assert _calls(handle, 3) and len(backend.calls) == 3
    backend.clock.t += 5.1
    assert _calls(handle, 1)[0][0] == "bentoml"
    assert [s for *_, s in backend.states] == ["closed", "open", "half-open", "open", "half-open", "closed"]


def test_half_open_lets_one_probe_through_and_concurrent_calls_do_not_wait_for_it():
    import threading

    backend = BreakingBackend("error", fail_max=1, reset_s=10.0)
    handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", 5.0)
    _calls(handle, 1)
    backend.clock.t += 10.1
    backend.mode, release = "ok", threading.Event()
    inner = backend.predict

    def slow_probe(*a):
        release.wait(5)
        return inner(*a)

    backend.predict = slow_probe
    probe = threading.Thread(target=lambda: _calls(handle, 1))
    probe.start()
    while backend.circuits.states()["light_ranker"] != "half-open":
        time.sleep(0.001)
    others = _calls(handle, 5)  # while the probe hangs: in-process at once, no second probe
    assert {p for p, _ in others} == {FALLBACK} and max(s for _, s in others) < 0.1
    release.set()
    probe.join(5)
    assert len(backend.calls) == 2 and backend.circuits.states() == {"light_ranker": "closed"}


def test_a_late_answer_from_before_the_breaker_opened_does_not_close_it():
    from mixer.scorers.remote import ModelCircuit

    circuit = ModelCircuit("bentoml", "heavy_ranker", fail_max=1, reset_s=10.0)
    late = circuit.attempt()
    late.__enter__()  # admitted while closed, still in flight
    with pytest.raises(ConnectionError), circuit.attempt():
        raise ConnectionError("refused")
    assert circuit.state == "open"
    late.__exit__(None, None, None)  # its success is stale news
    assert circuit.state == "open"


def test_breakers_are_per_model_and_survive_new_handles():
    backend = BreakingBackend("error", fail_max=2)
    heavy = LocalHandle()
    heavy.name = "heavy_ranker"
    light_handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", DEADLINE_S)
    _calls(light_handle, 2)
    assert backend.circuits.states() == {"light_ranker": "open"}
    _calls(RemoteRankerHandle(heavy, backend, "bentoml", DEADLINE_S), 1)  # heavy's breaker is its own
    assert backend.circuits.states() == {"light_ranker": "open", "heavy_ranker": "closed"}
    n = len(backend.calls)
    _calls(RemoteRankerHandle(LocalHandle(version=4), backend, "bentoml", DEADLINE_S), 3)  # a reload's new handle
    assert len(backend.calls) == n


def test_breaker_settings_are_validated_and_reconfigurable():
    from mixer.scorers.remote import CircuitBreakers, make_backend

    with pytest.raises(ValueError, match="fail_max"):
        CircuitBreakers("bentoml", 0, 10.0)
    with pytest.raises(ValueError, match="reset_s"):
        make_backend("bentoml", "http://127.0.0.1:1", fail_max=5, reset_s=0)
    backend = make_backend("bentoml", "http://127.0.0.1:1", fail_max=7, reset_s=3.0)
    try:
        assert (backend.circuits.fail_max, backend.circuits.reset_s) == (7, 3.0)
        circuit = backend.circuits.for_model("light_ranker")
        states = []
        backend.circuits.configure(2, 1.0, lambda *a: states.append(a))  # what the mixer does on each load
        assert states == [("bentoml", "light_ranker", "closed")]
        assert (circuit._breaker.fail_max, circuit._breaker.reset_timeout) == (2, 1.0)
    finally:
        backend.close()


def test_calls_through_a_closed_breaker_do_not_queue_behind_a_slow_one():
    """pybreaker's own ``call`` holds the breaker's lock for the whole call; the handle must not."""
    import threading

    backend = BreakingBackend()
    hung, release = threading.Event(), threading.Event()
    inner = backend.predict

    def first_call_hangs(*a):
        if not hung.is_set():
            hung.set()
            release.wait(5)
        return inner(*a)

    backend.predict = first_call_hangs
    handle = RemoteRankerHandle(LocalHandle(), backend, "bentoml", 5.0)
    slow = threading.Thread(target=lambda: _calls(handle, 1))
    slow.start()
    assert hung.wait(5)
    (path, seconds), = _calls(handle, 1)
    release.set()
    slow.join(5)
    assert path == "bentoml" and seconds < 0.5


def test_after_swap_collects_cycles_of_frozen_models_and_freezes_again():
    """Start-up froze the first models; a swap drops them. Their reference cycles must be collected
    (a frozen object never is) and the new models frozen."""
    import gc
    import weakref

    from mixer.api import _after_swap
    from mixer.config import load_config

    class Model:
        pass

    old = Model()
    old.self = old  # a cycle, as a torch module's graph has
    gone = weakref.ref(old)
    before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    try:
        del old
        gc.collect()
        assert gone() is not None  # frozen: a plain collection does not free it
        _after_swap(load_config())
        assert gone() is None and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
