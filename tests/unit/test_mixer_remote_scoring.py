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

    w = ModelAliasWatcher(pipe, lambda: dict(wanted), load, 60, metrics)
    assert w.check_once() is False and loads == []  # nothing moved: no load
    wanted["heavy_ranker"] = 2
    assert w.check_once() is True and pipe.model_versions == {"light_ranker": "1", "heavy_ranker": "2"}
    wanted["light_ranker"] = 9  # a version that cannot be served
    assert w.check_once() is False and pipe.model_versions["light_ranker"] == "1"
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
