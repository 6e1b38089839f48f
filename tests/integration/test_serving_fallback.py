"""The mixer's remote scoring keeps answering when the model server dies mid-run.

Real servers: a ``tritonserver`` (gRPC and HTTP, binary tensors) and ``bentoml serve``, each serving
rankers registered in a real MLflow. A run of scoring calls goes through ``RemoteRankerHandle``
(the mixer's scorer path); the server is SIGKILLed in the middle. Every call must still return
scores: remote before the kill, the in-process fallback of the same version after, equal within
1e-5 to in-process scoring either way, each fallback bounded by the deadline and counted.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.services import kill_tree
from core.state import StateDir
from mixer.scorers.remote import FALLBACK, RemoteRankerHandle, make_backend
from tests.dev_frame import build_dev_frame
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import load_ranker
from models.split import split_by_days
from models.train import train_heavy, train_light

pytestmark = pytest.mark.integration

CALLS, KILL_AT, DEADLINE_S = 30, 10, 0.25


@pytest.fixture(scope="module")
def registered(data_dir, tmp_path_factory):
    state = StateDir(tmp_path_factory.mktemp("fallback-state")).ensure()
    train, valid = split_by_days(build_dev_frame(data_dir, user_sample_mod=20), valid_days=2)
    train_light(train, valid, state, params=LightRankerParams(num_threads=1, num_boost_round=30))
    train_heavy(train, valid, state, params=HeavyRankerParams(max_epochs=1, num_threads=1, hidden=(32,), tower=8))
    return state, valid.sample(n=500, random_state=2).reset_index(drop=True)


def _start(kind: str, state: StateDir, rows):
    if kind.startswith("triton"):
        from serving.triton.install import TritonInstallation, TritonNotInstalledError
        from serving.triton.repository import sync_repository
        from serving.triton.server import TritonServer, repository_dir

        try:
            TritonInstallation.find()
        except TritonNotInstalledError as e:
            pytest.skip(f"Triton venv not installed: {e}")
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
        assert set(fallbacks) == {(HEAVY_RANKER_NAME, kind, "error")}  # refused, not a deadline
        backend.close()
    finally:
        srv.stop()
