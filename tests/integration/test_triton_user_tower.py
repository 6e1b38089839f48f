"""A real tritonserver (2.51, from the Triton venv) serves the two-tower model's user tower.

A small two-tower is trained on planted sequences (users who engage one topic each) and
registered in a real MLflow (SQLite) store; the repository is synced from that registry (ONNX
export checked against the in-process tower) and served by a real ``tritonserver`` (python
backend running onnxruntime). Triton's user vectors must equal the in-process ones within 1e-5
over gRPC and HTTP (binary tensors), alone and in concurrent requests; the mixer's
``user_tower: triton`` hydrator asks Triton, and falls back to the in-process tower when Triton is
down. Skips only when the Triton venv is not installed, as ``test_triton`` does.
"""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pandas as pd
import pytest

from core.schema import CHAMPION_ALIAS, TWO_TOWER_NAME
from core.state import StateDir
from models.two_tower import TwoTowerParams, fit_two_tower, latest_histories
from pipelines.sequences import ACTION_STRENGTH
from tests.integration.test_triton import installation  # noqa: F401  (the shared fixture: skip without Triton)

pytestmark = pytest.mark.integration

PARAMS = TwoTowerParams(dim=16, id_dim=16, tag_dim=4, hidden=32, epochs=3, batch_size=256, num_threads=1)
TOPICS, PER_TOPIC, USERS = 10, 30, 300


@pytest.fixture(scope="module")
def sequences() -> pd.DataFrame:
    """Each user engages 5-80 posts of one topic (so some histories pass the 64 the tower reads)."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(USERS):
        posts = rng.choice(PER_TOPIC * 3, size=int(rng.integers(5, 80)), replace=True) + (u % TOPICS) * PER_TOPIC * 3
        for i, p in enumerate(posts):
            rows.append((u, int(p), 5_000 + int(p) % 40, ACTION_STRENGTH[i % len(ACTION_STRENGTH)], 1.65e9 + 60.0 * (u * 100 + i)))
    return pd.DataFrame(rows, columns=["user_id", "post_id", "author_id", "action", "ts"])


@pytest.fixture(scope="module")
def state(sequences, tmp_path_factory) -> StateDir:
    """``two_tower`` v1 registered as champion (towers, candidate embeddings, flat index)."""
    import mlflow

    from models.ann_index import AnnIndex
    from models.registry import ensure_experiment, log_two_tower_model, mlflow_uris, promote

    st = StateDir(tmp_path_factory.mktemp("user-tower-state")).ensure()
    ids = np.unique(sequences["post_id"].to_numpy())
    posts = pd.DataFrame({"post_id": ids, "author_id": 5_000 + ids % 40, "primary_tag": ids // (PER_TOPIC * 3),
                          "duration_ms": 20_000.0, "video_type": "NORMAL"})
    fit = fit_two_tower(sequences, posts, PARAMS, progress=False)
    item_ids, vectors = fit.item_embeddings(posts)
    index = AnnIndex.build(item_ids, vectors, kind="flat")
    uri = st.mlflow_tracking_uri
    with mlflow_uris(uri):
        with mlflow.start_run(experiment_id=ensure_experiment(uri, st.mlflow_artifacts)):
            info = log_two_tower_model(fit, item_ids, vectors, index, TWO_TOWER_NAME)
    promote(TWO_TOWER_NAME, int(info.registered_model_version), CHAMPION_ALIAS, tracking_uri=uri)
    return st


@pytest.fixture(scope="module")
def histories(sequences) -> list[list[tuple]]:
    end = pd.Timestamp(sequences["ts"].max() + 1, unit="s", tz="UTC")
    return list(latest_histories(sequences, end, 64).values())


@pytest.fixture(scope="module")
def handle(state):
    from models.registry import load_two_tower

    return load_two_tower(state.mlflow_tracking_uri)


@pytest.fixture(scope="module")
def server(state, histories, installation):  # noqa: F811
    from serving.triton.repository import sync_user_tower
    from serving.triton.server import TritonServer, repository_dir

    started = time.monotonic()
    sync = sync_user_tower(TWO_TOWER_NAME, state.mlflow_tracking_uri, repository_dir(state), histories)
    export_s = time.monotonic() - started
    assert sync.served == (1,) and [e.kind for e in sync.exported] == ["user_tower"]
    assert sync.exported[0].max_abs_diff <= 1e-5 and sync.exported[0].rows_checked == len(histories) + 3
    srv = TritonServer(state, models=(TWO_TOWER_NAME,), installation=installation).start(timeout_s=120)
    print(f"\n[triton] user tower export {export_s:.1f} s, start {srv.started_seconds:.1f} s")
    yield srv
    srv.stop()


def _client(server, protocol):
    from serving.triton.client import TritonUserTowerClient

    url = server.grpc_url if protocol == "grpc" else server.http_url
    return TritonUserTowerClient(url, TWO_TOWER_NAME, protocol=protocol, timeout_s=10.0)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_user_vectors_equal_in_process(server, handle, histories, protocol):
    seqs = [*histories, [], [(10**12, 1, "like")]]
    want = handle.user_embeddings(seqs)
    with _client(server, protocol) as client:
        got = client.user_embeddings(seqs, handle.model)
        assert got.dtype == np.float32 and got.shape == want.shape == (len(seqs), PARAMS.dim)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(client.user_embeddings(seqs[:1], handle.model, version=1), want[:1], rtol=0, atol=1e-5)
        # concurrent single-user requests (a mixer per request) are batched by Triton and split back
        with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(client.user_embeddings, [s], handle.model) for s in seqs[:40]]
            for f, w in zip(futures, want[:40]):
                np.testing.assert_allclose(f.result()[0], w, rtol=0, atol=1e-5)


def test_a_second_sync_exports_nothing_and_clear_errors(server, state, histories, handle):
    from serving.triton.client import TritonUnavailable
    from serving.triton.repository import sync_user_tower
    from serving.triton.server import repository_dir

    again = sync_user_tower(TWO_TOWER_NAME, state.mlflow_tracking_uri, repository_dir(state),
                            lambda: pytest.fail("nothing to export: the check data must not be read"))
    assert not again.changed and again.served == (1,)
    with _client(server, "grpc") as client:
        with pytest.raises(TritonUnavailable, match="two_tower v9"):
            client.user_embeddings(histories[:2], handle.model, version=9)


def test_the_mixer_asks_triton_and_falls_back_in_process_when_triton_is_down(server, state, handle, histories,
                                                                            tmp_path):
    """``candidate_sources.embedding.user_tower: triton``: ``UserEmbeddingQueryHydrator`` gets
    Triton's vector; with Triton unreachable, the in-process one, counted as a fallback."""
    import prometheus_client

    from core.services import free_port
    from mixer.api import _load_retrieval, _user_tower_backend
    from mixer.candidate import EngagedAction, Query
    import yaml

    from mixer.config import load_config
    from mixer.metrics import MixerMetrics
    from mixer.query_hydrators.user_embedding import UserEmbeddingQueryHydrator

    seq = tuple(EngagedAction(p, a, act, 0.0) for p, a, act in histories[3])
    query = Query(user_id=3, page_size=20, now_s=0.0, request_id="r", action_sequence=seq)
    want = handle.user_embeddings([list(seq)])[0]
    for url, path in ((server.grpc_url, "triton_grpc"), (f"127.0.0.1:{free_port()}", "in_process_fallback")):
        (tmp_path / "mixer.yaml").write_text(yaml.safe_dump({
            "models": {"tracking_uri": state.mlflow_tracking_uri},
            "candidate_sources": {"embedding": {"user_tower": "triton", "triton_url": url, "triton_timeout_ms": 2000}}}))
        config = load_config(tmp_path / "mixer.yaml")
        metrics = MixerMetrics(registry=prometheus_client.CollectorRegistry())
        backend = _user_tower_backend(config)
        try:
            remote = _load_retrieval(config, metrics, backend)
            got = UserEmbeddingQueryHydrator(remote).hydrate(query).user_embedding
            assert remote.last_path == path and remote.version == handle.version
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            fallbacks = metrics.registry.get_sample_value(
                "hm_mixer_scoring_fallbacks_total", {"model": TWO_TOWER_NAME, "backend": "triton_grpc", "reason": "error"})
            assert (fallbacks or 0) == (0 if path == "triton_grpc" else 1)
        finally:
            backend.close()
