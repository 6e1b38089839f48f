"""The BentoML ranker server for real: ``bentoml serve`` as a child process on loopback, models
trained on a slice of the real log and registered in a real MLflow (SQLite) store."""

from __future__ import annotations

import json
import socket
import time

import httpx
import numpy as np
import pytest

from core.schema import HEADS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.services import ServiceError, child_pids, pid_alive
from core.state import StateDir
from tests.dev_frame import build_dev_frame
from models.features import feature_matrix
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import load_ranker, promote
from models.split import split_by_days
from models.train import train_heavy, train_light
from serving.bento.client import BentoRankerClient, BentoRequestError, BentoTimeout, BentoUnavailable
from serving.bento.server import BentoServer

pytestmark = pytest.mark.integration

# small, fast models: the test is about serving, not model quality
LIGHT_PARAMS = LightRankerParams(num_threads=1, num_boost_round=40)
HEAVY_PARAMS = HeavyRankerParams(max_epochs=2, num_threads=1, hidden=(64, 32), tower=16)


@pytest.fixture(scope="module")
def frames(data_dir):
    return split_by_days(build_dev_frame(data_dir, user_sample_mod=20), valid_days=2)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return StateDir(tmp_path_factory.mktemp("bento-state")).ensure()


@pytest.fixture(scope="module")
def champions(frames, state):
    """light_ranker v1 and heavy_ranker v1, both aliased champion."""
    train, valid = frames
    light = train_light(train, valid, state, params=LIGHT_PARAMS)
    heavy = train_heavy(train, valid, state, params=HEAVY_PARAMS)
    assert (light.model_version, heavy.model_version) == (1, 1)
    return light, heavy


@pytest.fixture(scope="module")
def server(champions, state):
    srv = BentoServer(state).start(timeout_s=120)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with BentoRankerClient(server.url) as c:
        yield c


@pytest.fixture(scope="module")
def rows(frames):
    """1000 real validation rows (cold users/posts/pairs leave NaN features)."""
    return frames[1].tail(1000).reset_index(drop=True)


def _handle(name, state, alias="champion"):
    return load_ranker(name, alias, tracking_uri=state.mlflow_tracking_uri)


def test_scores_equal_in_process_predict(server, client, rows, state):
    assert server.ready() and client.ready()
    for name, heads in ((LIGHT_RANKER_NAME, ("engaged",)), (HEAVY_RANKER_NAME, HEADS)):
        handle = _handle(name, state)
        x = feature_matrix(rows, handle.feature_names)
        assert np.isnan(x).any(), "the rows should exercise missing features"
        expected = handle.predict(rows)
        got = client.predict(x, name, handle.version, timeout_s=10.0)
        assert got.dtype == np.float32 and got.shape == (len(rows), len(heads)) == expected.shape
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        # without a version the champion alias is resolved: the same model
        np.testing.assert_allclose(client.predict(x, name, None, timeout_s=10.0), expected, rtol=0, atol=1e-5)
        assert client.predict(x[:0], name, handle.version, timeout_s=10.0).shape == (0, len(heads))


def test_models_info_lists_loaded_versions(client, state):
    info = client.models()
    assert info["service"] == "home_mixer_rankers"
    for name in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME):
        handle = _handle(name, state)
        entry = info["models"][name]
        assert entry["load_error"] is None
        v = entry["versions"][str(handle.version)]
        assert v["feature_names"] == list(handle.feature_names)
        assert v["heads"] == list(handle.heads)
        assert v["run_id"] == handle.run_id


def test_new_versions_served_without_restart(server, client, frames, rows, state):
    train, valid = frames
    pid = server.pid
    v1 = _handle(LIGHT_RANKER_NAME, state)
    x = feature_matrix(rows, v1.feature_names)
    client.predict(x, LIGHT_RANKER_NAME, v1.version, timeout_s=10.0)
    versions = [v1.version]
    for rounds in (15, 5):  # registered while the server runs; champion stays on v1
        res = train_light(train, valid, state, set_champion=False,
                          params=LightRankerParams(num_threads=1, num_boost_round=rounds, early_stopping_rounds=0))
        promote(LIGHT_RANKER_NAME, res.model_version, alias="challenger", tracking_uri=state.mlflow_tracking_uri)
        new = _handle(LIGHT_RANKER_NAME, state, alias="challenger")
        expected = new.predict(rows)
        got = client.predict(x, LIGHT_RANKER_NAME, new.version, timeout_s=30.0)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        assert np.abs(expected - v1.predict(rows)).max() > 1e-3, "versions should score differently"
        # the alias path resolves per request, so a moved alias is served at once
        np.testing.assert_allclose(client.predict(x, LIGHT_RANKER_NAME, None, timeout_s=30.0, alias="challenger"),
                                   expected, rtol=0, atol=1e-5)
        versions.append(new.version)
    assert server.pid == pid and server.running(state).pid == pid  # same process throughout
    loaded = client.models()["models"][LIGHT_RANKER_NAME]["versions"]
    assert sorted(int(v) for v in loaded) == versions[-2:]  # LRU of the 2 most recent versions
    # the evicted champion is loaded again on demand and still scores as before
    np.testing.assert_allclose(client.predict(x, LIGHT_RANKER_NAME, v1.version, timeout_s=30.0),
                               v1.predict(rows), rtol=0, atol=1e-5)


def test_bad_requests_get_clear_4xx(server, client, rows, state):
    handle = _handle(HEAVY_RANKER_NAME, state)
    x = feature_matrix(rows.head(10), handle.feature_names)
    n_features = len(handle.feature_names)

    with pytest.raises(BentoRequestError) as e:
        client.predict(x[:, :-1], HEAVY_RANKER_NAME, handle.version, timeout_s=10.0)
    assert e.value.status == 400
    assert f"takes {n_features} feature columns, the request has {n_features - 1}" in e.value.message
    assert handle.feature_names[0] in e.value.message  # says the expected order

    with pytest.raises(BentoRequestError) as e:
        client.predict(x, "no_such_ranker", 1, timeout_s=10.0)
    assert e.value.status == 404 and "unknown model 'no_such_ranker'" in e.value.message

    with pytest.raises(BentoRequestError) as e:
        client.predict(x, HEAVY_RANKER_NAME, 99, timeout_s=10.0)
    assert e.value.status == 404 and "no version 99" in e.value.message

    url = server.url + "/predict"
    base = {"Content-Type": "application/octet-stream", "X-Model": HEAVY_RANKER_NAME}
    body = np.ascontiguousarray(x, dtype="<f4").tobytes()
    cases = [
        ({"X-Shape": f"11,{n_features}"}, body, "needs"),            # body shorter than the shape says
        ({"X-Shape": "ten,3"}, body, "X-Shape must be 'rows,columns'"),
        ({}, body, "missing header X-Shape"),
        ({"X-Shape": f"10,{n_features}", "X-Model-Version": "latest"}, body, "X-Model-Version must be"),
    ]
    for extra, content, fragment in cases:
        r = httpx.post(url, content=content, headers={**base, **extra}, timeout=10.0)
        assert r.status_code == 400, (extra, r.text)
        assert fragment in r.json()["error"], (extra, r.text)
    r = httpx.post(url, content=body, headers={"Content-Type": "application/octet-stream",
                                               "X-Shape": f"10,{n_features}"}, timeout=10.0)
    assert r.status_code == 400 and "missing header X-Model" in r.json()["error"]


def test_cli_start_status_stop_and_client_deadlines(champions, state, tmp_path, monkeypatch, capsys, rows):
    """A second server through the CLI (own state folder, same registry); after stop the client
    fails fast with BentoUnavailable, and a server that never answers costs one deadline."""
    from home_mixer.cli import main

    def cli(*argv) -> int:
        return main(["--state", str(tmp_path / "state2"), "serve", "bentoml", *argv])

    monkeypatch.setenv("HOME_MIXER_STATE", str(tmp_path / "state2"))  # --state exports it: restored after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", state.mlflow_tracking_uri)
    monkeypatch.setenv("HOME_MIXER_BENTO_MODELS", LIGHT_RANKER_NAME)
    assert cli("start", "--timeout", "120") == 0
    assert "bentoml started: http://127.0.0.1:" in capsys.readouterr().out
    try:
        assert cli("status", "--json") == 0
        status = json.loads(capsys.readouterr().out)
        assert status["running"] and status["ready"]
        handle = _handle(LIGHT_RANKER_NAME, state)
        x = feature_matrix(rows.head(50), handle.feature_names)
        with BentoRankerClient(status["url"]) as c:
            assert c.models()["models"].keys() == {LIGHT_RANKER_NAME}
            np.testing.assert_allclose(c.predict(x, LIGHT_RANKER_NAME, handle.version, 10.0),
                                       handle.predict(rows.head(50)), rtol=0, atol=1e-5)
            with pytest.raises(BentoRequestError):
                c.predict(x, HEAVY_RANKER_NAME, 1, 10.0)  # not served by this one
        workers = child_pids(status["pid"])
        assert workers, "bentoml serve runs its service in worker processes"
    finally:
        assert cli("stop") == 0
    assert not any(pid_alive(w) for w in workers)
    assert "bentoml stopped" in capsys.readouterr().out
    assert not pid_alive(status["pid"])
    assert cli("status") == 1 and "bentoml: stopped" in capsys.readouterr().out

    with BentoRankerClient(status["url"]) as c:
        started = time.monotonic()
        with pytest.raises(BentoUnavailable, match="unreachable"):
            c.predict(x, LIGHT_RANKER_NAME, handle.version, timeout_s=0.5)
        assert time.monotonic() - started < 0.5
        assert not c.ready()

    # a listener that accepts connections and never answers: the deadline, then BentoTimeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        with BentoRankerClient(f"http://127.0.0.1:{silent.getsockname()[1]}") as c:
            started = time.monotonic()
            with pytest.raises(BentoTimeout, match="deadline of 0.3 s exceeded"):
                c.predict(x, LIGHT_RANKER_NAME, handle.version, timeout_s=0.3)
            assert 0.3 <= time.monotonic() - started < 1.0


def test_start_fails_fast_when_a_model_is_not_registered(champions, state, tmp_path):
    srv = BentoServer(StateDir(tmp_path / "state3").ensure())
    started = time.monotonic()
    with pytest.raises(ServiceError, match="could not load no_such_ranker .*'no_such_ranker' has no alias 'champion'"):
        srv.start(timeout_s=120, tracking_uri=state.mlflow_tracking_uri, models=("no_such_ranker",))
    assert time.monotonic() - started < 60  # not the whole timeout
    assert BentoServer.running(srv.state) is None
    assert "pid" not in json.loads((srv.state.run / "bentoml.json").read_text())  # forgotten, port kept
