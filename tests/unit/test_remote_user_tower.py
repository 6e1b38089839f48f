"""The user tower on a model server (``candidate_sources.embedding.user_tower: triton``): config
validation, and the fallback to the in-process tower (same inputs, counted, circuit breaker)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mixer.config import ConfigError, load_config
from mixer.query_hydrators.remote_user_tower import RemoteUserTowerHandle
from mixer.scorers.remote import FALLBACK, CircuitBreakers
from models.registry import TwoTowerHandle
from models.two_tower import TwoTowerFit, TwoTowerParams, build_net

PARAMS = TwoTowerParams(dim=8, id_dim=8, tag_dim=4, hidden=16, max_sequence_length=6)
SEQS = [[(11, 101, "like"), (12, 102, "long_view")], [], [(999, 5, "follow")]]


@pytest.fixture(scope="module")
def local() -> TwoTowerHandle:
    torch.manual_seed(0)
    net = build_net(3, 3, 2, PARAMS).eval()
    fit = TwoTowerFit(net=net, params=PARAMS, post_vocab=np.array([10, 11, 12]), author_vocab=np.array([100, 101, 102]),
                      tag_vocab=np.array([1, 2]))
    return TwoTowerHandle(name="two_tower", alias="champion", version=3, run_id="r", model=fit, index=None,
                          item_ids=np.zeros(0, np.int64), item_vectors=np.zeros((0, 8), np.float32))


class Server:
    """A model-server stand-in: answers with ``answer(inputs)`` or raises ``error``."""

    def __init__(self, answer=None, error: Exception | None = None):
        self.answer, self.error, self.calls = answer, error, []

    def embed(self, inputs, version=None, timeout_s=None):
        self.calls.append((inputs, version, timeout_s))
        if self.error is not None:
            raise self.error
        return self.answer(inputs)


def test_config_switch_is_validated(tmp_path):
    import yaml

    def config(embedding: dict):
        path = tmp_path / "mixer.yaml"
        path.write_text(yaml.safe_dump({"candidate_sources": {"embedding": embedding}}))
        return load_config(path)

    emb = load_config(None).candidate_sources.embedding
    assert emb.user_tower == "in_process" and emb.triton_url is None
    assert config({"user_tower": "triton", "triton_url": "127.0.0.1:8001"}).candidate_sources.embedding.user_tower \
        == "triton"
    for bad, message in (({"user_tower": "triton"}, "triton_url"), ({"user_tower": "bentoml"}, "user_tower"),
                         ({"triton_timeout_ms": 0}, "triton_timeout_ms")):
        with pytest.raises(ConfigError, match=message):
            config(bad)


def test_the_server_answers_with_the_served_version_and_the_shared_inputs(local):
    want = local.user_embeddings(SEQS)
    server = Server(answer=lambda inputs: local.model.user_vectors(inputs) * 1.0)
    handle = RemoteUserTowerHandle(local, server, timeout_s=0.02)
    np.testing.assert_array_equal(handle.user_embeddings(SEQS), want)
    inputs, version, timeout = server.calls[0]
    assert version == 3 and timeout == 0.02 and handle.last_path == "triton_grpc"
    for name, array in local.model.user_tower_inputs(SEQS).arrays().items():
        np.testing.assert_array_equal(inputs.arrays()[name], array)
    assert (handle.version, handle.name, handle.dim) == (3, "two_tower", 8)
    assert handle.user_embeddings([]).shape == (0, 8) and len(server.calls) == 1  # nothing to ask


def test_errors_timeouts_and_wrong_shapes_fall_back_in_process_and_are_counted(local):
    want = local.user_embeddings(SEQS)
    seen = []
    circuits = CircuitBreakers("triton_grpc", fail_max=2, reset_s=60)
    for server, reason in ((Server(error=RuntimeError("connection refused")), "error"),
                           (Server(error=TimeoutError("no answer")), "timeout")):
        handle = RemoteUserTowerHandle(local, server, 0.02, circuits.for_model("two_tower"),
                                       on_fallback=lambda *a: seen.append(a))
        np.testing.assert_array_equal(handle.user_embeddings(SEQS), want)
        assert handle.last_path == FALLBACK and seen[-1] == ("two_tower", "triton_grpc", reason)
    # two failures in a row opened the breaker: the next call does not reach the server
    server = Server(answer=lambda inputs: np.zeros((inputs.batch, 8), np.float32))
    handle = RemoteUserTowerHandle(local, server, 0.02, circuits.for_model("two_tower"), lambda *a: seen.append(a))
    np.testing.assert_array_equal(handle.user_embeddings(SEQS), want)
    assert not server.calls and seen[-1][2] == "circuit_open"
    wrong = RemoteUserTowerHandle(local, Server(answer=lambda inputs: np.zeros((1, 8), np.float32)), 0.02,
                                  on_fallback=lambda *a: seen.append(a))
    np.testing.assert_array_equal(wrong.user_embeddings(SEQS), want)
    assert seen[-1][2] == "error"
    # a malformed sequence is the request's fault: raised, not sent, not counted
    n = len(seen)
    with pytest.raises(ValueError, match="must be integers"):
        wrong.user_embeddings([[("a", 1, "like")]])
    assert len(seen) == n
