"""A real tritonserver (2.51, from the Triton venv) on loopback serves both registered rankers.

Rankers are trained small on a slice of the real log and registered in a real MLflow (SQLite in a
temporary state folder); the repository is synced from that registry and served by a real
``tritonserver`` whose answers must equal in-process ``RankerHandle.predict`` within 1e-5 over
gRPC and HTTP (binary tensors). Then a new heavy ranker version is promoted, synced and loaded
without a restart, and the previous one still answers (rollback).

Skips only when the Triton venv is not installed (``bash scripts/setup_triton.sh`` installs it).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import time
from contextlib import redirect_stdout

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from tests.dev_frame import build_dev_frame
from models.features import feature_matrix
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import load_ranker, promote
from models.split import split_by_days
from models.train import train_heavy, train_light
from serving.triton.install import TritonInstallation, TritonNotInstalledError

pytestmark = pytest.mark.integration

SMALL_LIGHT = LightRankerParams(num_threads=1, num_boost_round=40)
SMALL_HEAVY = HeavyRankerParams(max_epochs=2, num_threads=1, hidden=(32, 16), tower=8)
PROTOCOLS = ("grpc", "http")


@pytest.fixture(scope="module")
def installation():
    try:
        return TritonInstallation.find()
    except TritonNotInstalledError as e:
        pytest.skip(f"Triton venv not installed: {e}")


@pytest.fixture(scope="module")
def frames(data_dir):
    return split_by_days(build_dev_frame(data_dir, user_sample_mod=20), valid_days=2)


@pytest.fixture(scope="module")
def state(installation, frames, tmp_path_factory):
    """Registered light_ranker v1 and heavy_ranker v1 (champions) and a training set on disk."""
    st = StateDir(tmp_path_factory.mktemp("triton-state")).ensure()
    train, valid = frames
    train_light(train, valid, st, params=SMALL_LIGHT)
    train_heavy(train, valid, st, params=SMALL_HEAVY)
    # the CLI reads its check rows from the state's training set, as after `features build`
    pd.concat([train, valid]).to_parquet(st.table("training_set"), coerce_timestamps="us", allow_truncated_timestamps=True)
    return st


@pytest.fixture(scope="module")
def rows(frames):
    valid = frames[1]
    return valid.sample(n=min(2000, len(valid)), random_state=1).reset_index(drop=True)


@pytest.fixture(scope="module")
def server(state, rows, installation):
    from serving.triton.repository import sync_repository
    from serving.triton.server import TritonServer, repository_dir

    started = time.monotonic()
    report = sync_repository(state.mlflow_tracking_uri, repository_dir(state), rows)
    sync_s = time.monotonic() - started
    srv = TritonServer(state, installation=installation).start(timeout_s=120)
    print(f"\n[triton] sync+export {sync_s:.1f} s, start {srv.started_seconds:.1f} s")
    assert all(s.served == (1,) for s in report.values())
    yield srv
    srv.stop()


def _client(server, name, protocol, timeout_s=10.0):
    from serving.triton.client import TritonRankerClient

    url = server.grpc_url if protocol == "grpc" else server.http_url
    return TritonRankerClient(url, name, protocol=protocol, timeout_s=timeout_s)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name,n_heads", [(LIGHT_RANKER_NAME, 1), (HEAVY_RANKER_NAME, len(HEADS))])
def test_triton_scores_equal_in_process(server, state, rows, name, n_heads, protocol):
    handle = load_ranker(name, tracking_uri=state.mlflow_tracking_uri)
    x = feature_matrix(rows, handle.feature_names)
    assert np.isnan(x).any()
    with _client(server, name, protocol) as client:
        got = client.predict(x)
        want = handle.predict(rows)
        assert got.dtype == np.float32 and got.shape == want.shape == (len(rows), n_heads)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(client.predict(x[:1], version=1), want[:1], rtol=0, atol=1e-5)

        # latency of a 1000-row frame, both sides from the frame (informational, printed with -s;
        # noisy when other processes share the cores)
        frame = rows.iloc[:1000]
        remote, local = [], []
        for _ in range(15):
            t = time.perf_counter()
            client.predict(feature_matrix(frame, handle.feature_names))
            remote.append(time.perf_counter() - t)
            t = time.perf_counter()
            handle.predict(frame)
            local.append(time.perf_counter() - t)
    print(f"\n[triton] {name} {protocol}: p50 {np.median(remote) * 1e3:.1f} ms / 1000 rows "
          f"(in-process {np.median(local) * 1e3:.1f} ms)")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_dynamic_batches_of_concurrent_requests_are_split_back(server, state, rows, protocol):
    handle = load_ranker(HEAVY_RANKER_NAME, tracking_uri=state.mlflow_tracking_uri)
    x = feature_matrix(rows, handle.feature_names)
    want = handle.predict(rows)
    sizes = [1, 7, 50, 200, 333, 3, 120, 64] * 2
    starts = np.cumsum([0, *sizes[:-1]]) % (len(x) - max(sizes))
    with _client(server, HEAVY_RANKER_NAME, protocol) as client, \
            concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(client.predict, x[s:s + n]) for s, n in zip(starts, sizes)]
        for f, s, n in zip(futures, starts, sizes):
            np.testing.assert_allclose(f.result(), want[s:s + n], rtol=0, atol=1e-5)


def test_client_errors_are_clear(server, rows, state):
    from core.services import free_port
    from serving.triton.client import TritonRankerClient, TritonUnavailable

    x = feature_matrix(rows.iloc[:10], load_ranker(LIGHT_RANKER_NAME, tracking_uri=state.mlflow_tracking_uri).feature_names)
    big = np.repeat(x, 1000, axis=0)
    for protocol in PROTOCOLS:
        with _client(server, LIGHT_RANKER_NAME, protocol) as client, \
                _client(server, "no_such_model", protocol) as unknown, \
                TritonRankerClient(f"127.0.0.1:{free_port()}", LIGHT_RANKER_NAME, protocol, timeout_s=0.5) as dead:
            with pytest.raises(TritonUnavailable, match="light_ranker v9"):
                client.predict(x, version=9)
            with pytest.raises(TritonUnavailable, match="could not score"):
                unknown.predict(x)
            started = time.monotonic()
            with pytest.raises(TritonUnavailable):
                dead.predict(x)
            assert time.monotonic() - started < 3.0
            with pytest.raises(ValueError, match=r"\[N, F\]"):
                client.predict(x[0])
            # a deadline shorter than any answer: the call gives up instead of waiting
            with pytest.raises(TritonUnavailable) as missed:
                client.predict(big, timeout_s=1e-4)
            from mixer.scorers.remote import fallback_reason

            assert fallback_reason(missed.value) == "timeout", missed.value.reason  # counted as a deadline
            # and the client still works afterwards
            assert client.predict(x).shape == (len(x), 1)


def test_promote_sync_load_serves_new_version_and_keeps_rollback(server, state, frames, rows):
    from serving.triton.repository import read_manifest, sync_repository
    from serving.triton.server import repository_dir

    uri = state.mlflow_tracking_uri
    old = load_ranker(HEAVY_RANKER_NAME, tracking_uri=uri)
    train, valid = frames
    new_version = train_heavy(train, valid, state, set_champion=False,
                              params=HeavyRankerParams(max_epochs=2, num_threads=1, hidden=(16,), tower=4, seed=11)
                              ).model_version
    assert new_version == old.version + 1
    x = feature_matrix(rows, old.feature_names)
    with _client(server, HEAVY_RANKER_NAME, "grpc") as grpc:
        before = grpc.predict(x)

    promote(HEAVY_RANKER_NAME, new_version, tracking_uri=uri)
    started = time.monotonic()
    report = sync_repository(uri, repository_dir(state), rows)
    assert [e.version for e in report[HEAVY_RANKER_NAME].exported] == [new_version]
    assert report[HEAVY_RANKER_NAME].served == (old.version, new_version)
    assert not report[LIGHT_RANKER_NAME].changed
    assert server.load(HEAVY_RANKER_NAME) == [old.version, new_version]
    print(f"\n[triton] rollout (export + load v{new_version}) {time.monotonic() - started:.1f} s")

    new = load_ranker(HEAVY_RANKER_NAME, tracking_uri=uri)
    assert new.version == new_version
    want_new, want_old = new.predict(rows), old.predict(rows)
    assert np.abs(want_new - want_old).max() > 1e-3  # really another model
    for protocol in PROTOCOLS:
        with _client(server, HEAVY_RANKER_NAME, protocol) as client:
            np.testing.assert_allclose(client.predict(x, version=new_version), want_new, rtol=0, atol=1e-5)
            np.testing.assert_allclose(client.predict(x, version=old.version), want_old, rtol=0, atol=1e-5)
            np.testing.assert_allclose(client.predict(x), want_new, rtol=0, atol=1e-5)  # default: newest
    np.testing.assert_allclose(before, want_old, rtol=0, atol=1e-5)

    # rollback: the alias moves back; nothing to export, both versions stay served
    promote(HEAVY_RANKER_NAME, old.version, tracking_uri=uri)
    report = sync_repository(uri, repository_dir(state), rows)
    assert not report[HEAVY_RANKER_NAME].changed
    assert read_manifest(repository_dir(state) / HEAVY_RANKER_NAME)["aliases"] == {"champion": old.version}
    assert server.load(HEAVY_RANKER_NAME) == [old.version, new_version]
    with _client(server, HEAVY_RANKER_NAME, "http") as client:
        np.testing.assert_allclose(client.predict(x, version=old.version), want_old, rtol=0, atol=1e-5)
    # light ranker untouched throughout
    assert server.versions(LIGHT_RANKER_NAME) == [1]


def test_broken_new_version_fails_loudly_and_served_versions_keep_answering(server, state, rows):
    import shutil

    from core.services import ServiceError
    from serving.triton.repository import RepositorySettings, read_manifest, write_configs
    from serving.triton.server import repository_dir

    model_dir = repository_dir(state) / HEAVY_RANKER_NAME
    manifest = read_manifest(model_dir)
    served = server.versions(HEAVY_RANKER_NAME)
    broken = model_dir / "99"
    broken.mkdir()
    try:
        (broken / "model.onnx").write_bytes(b"not an onnx model")
        shutil.copyfile(model_dir / str(served[0]) / "model.py", broken / "model.py")
        write_configs(model_dir, manifest["n_features"], len(manifest["heads"]), [*served, 99], RepositorySettings())
        with pytest.raises(ServiceError, match="version 99"):
            server.load(HEAVY_RANKER_NAME)
        assert server.versions(HEAVY_RANKER_NAME) == served
        handle = load_ranker(HEAVY_RANKER_NAME, tracking_uri=state.mlflow_tracking_uri)
        x = feature_matrix(rows.iloc[:50], handle.feature_names)
        with _client(server, HEAVY_RANKER_NAME, "grpc") as client:
            np.testing.assert_allclose(client.predict(x, version=handle.version), handle.predict(rows.iloc[:50]),
                                       rtol=0, atol=1e-5)
    finally:
        shutil.rmtree(broken)
        write_configs(model_dir, manifest["n_features"], len(manifest["heads"]), manifest["served"], RepositorySettings())


def test_cli_status_sync_and_export(server, state, tmp_path, monkeypatch):
    from home_mixer.cli import main

    monkeypatch.setenv("HOME_MIXER_STATE", str(state.root))  # --state exports it: restored after

    def run(*argv) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            assert main(["--state", str(state.root), *argv]) == 0
        return out.getvalue()

    status = json.loads(run("serve", "triton", "status", "--json"))
    assert status["running"] and status["pid"] == server.pid
    assert set(status["models"]) == {LIGHT_RANKER_NAME, HEAVY_RANKER_NAME}
    assert run("serve", "triton", "status").startswith(f"triton: running grpc {server.grpc_url}")
    served = server.versions(HEAVY_RANKER_NAME)
    synced = run("serve", "triton", "sync")  # the registry did not move: nothing to export or load
    assert f"heavy_ranker: unchanged, ready versions {served}" in synced and "exported" not in synced
    text = run("export", "--model", "light", "--out", str(tmp_path / "light"), "--rows", "300")
    assert "light_ranker@champion = v1" in text and (tmp_path / "light" / "model.onnx").exists()
