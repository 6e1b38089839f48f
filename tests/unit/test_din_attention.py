"""Target attention over the user action sequence in the heavy ranker (DIN, Zhou et al. 2018)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from core.history_features import ATTENTION_LENGTH, SEQUENCE_ID_FEATURES
from core.id_features import ID_BUCKETS, id_bucket, sequence_bucket_rows
from core.schema import HEADS
from models.features import InputNormalisation
from models.heavy_ranker import HeavyRankerNet

IDS = ["id_post_bucket", "id_author_bucket"]
NAMES = ["f0", *IDS, *SEQUENCE_ID_FEATURES]


def _bucket(kind: str, ids) -> np.ndarray:
    _, b, salt = ID_BUCKETS[kind]
    return id_bucket(np.asarray(ids, dtype=np.int64), b, salt)


def test_sequence_rows_hash_like_the_candidate_ids_and_pad_with_zero():
    row = sequence_bucket_rows([11, 12, 13], [5, -1, 7])
    assert row.shape == (2 * ATTENTION_LENGTH,)
    np.testing.assert_array_equal(row[:3], _bucket("id_post_bucket", [11, 12, 13]))
    np.testing.assert_array_equal(row[ATTENTION_LENGTH:ATTENTION_LENGTH + 3], [*_bucket("id_author_bucket", [5]), 0.0,
                                                                              *_bucket("id_author_bucket", [7])])
    assert not row[3:ATTENTION_LENGTH].any() and not row[ATTENTION_LENGTH + 3:].any()
    long = sequence_bucket_rows(np.arange(100), np.arange(100))  # only the newest L are kept
    np.testing.assert_array_equal(long[:ATTENTION_LENGTH], _bucket("id_post_bucket", np.arange(ATTENTION_LENGTH)))


def _net(seed: int = 0, attention: bool = True) -> tuple[HeavyRankerNet, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = 64
    x = np.zeros((n, len(NAMES)), dtype=np.float32)
    x[:, 0] = rng.normal(size=n)
    x[:, 1:3] = rng.integers(1, 50, size=(n, 2))
    x[:, 3:] = rng.integers(1, 50, size=(n, len(SEQUENCE_ID_FEATURES)))
    norm = InputNormalisation.fit(x, NAMES)
    torch.manual_seed(seed)
    net = HeavyRankerNet(norm, HEADS, hidden=(8,), tower=4, sequence_attention=attention).eval()
    for e in net.id_embeddings:
        torch.nn.init.normal_(e.weight, std=1.0)
    for t in net.towers:
        torch.nn.init.normal_(t[-1].weight, std=0.5)
    return net, x


def test_attention_reads_the_sequence_and_ignores_padding():
    net, x = _net()
    assert net.attends
    with torch.no_grad():
        base = net(torch.from_numpy(x))
        changed = x.copy()
        changed[:, 3] = changed[:, 3] % 49 + 1  # another post at position 0
        assert (net(torch.from_numpy(changed)) - base).abs().max() > 1e-4
        short = x.copy()
        short[:, 3 + 8:3 + ATTENTION_LENGTH] = 0.0  # a shorter sequence: padding
        short[:, 3 + ATTENTION_LENGTH + 8:] = 0.0
        padded = short.copy()
        padded[:, 3 + 8:3 + ATTENTION_LENGTH] = np.nan  # NaN padding = zero padding
        torch.testing.assert_close(net(torch.from_numpy(short)), net(torch.from_numpy(padded)))
        # sum pooling: the order of the behaviours does not matter, only which they are
        perm = short.copy()
        perm[:, 3:3 + 8] = short[:, 3:3 + 8][:, ::-1]
        perm[:, 3 + ATTENTION_LENGTH:3 + ATTENTION_LENGTH + 8] = short[:, 3 + ATTENTION_LENGTH:3 + ATTENTION_LENGTH + 8][:, ::-1]
        torch.testing.assert_close(net(torch.from_numpy(short)), net(torch.from_numpy(perm)))
        # an empty sequence pools to zeros
        empty = torch.from_numpy(np.where(np.arange(len(NAMES)) >= 3, 0.0, x).astype(np.float32))
        assert net.attend(empty, net.embed_ids(empty)).abs().max() == 0


def test_sequence_columns_never_enter_the_dense_input():
    for attention in (True, False):
        net, x = _net(attention=attention)
        u = net.normalise(torch.from_numpy(x))
        assert torch.all(u[:, 1:] == 0) and torch.any(u[:, 0] != 0)
        width = len(NAMES) + 2 * 8 + (2 * 8 if attention else 0)  # hashes enter as zeros
        assert net.inputs(torch.from_numpy(x)).shape == (len(x), width)


def test_attention_model_exports_to_onnx_with_the_same_outputs(tmp_path):
    import onnxruntime as ort

    net, x = _net(seed=3)
    x[2, 3 + 5:3 + ATTENTION_LENGTH] = np.nan
    program = torch.onnx.export(net.eval(), (torch.from_numpy(x[:4]),), dynamo=True,
                                input_names=["features"], output_names=["probabilities"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "din.onnx"))
    out = ort.InferenceSession(str(tmp_path / "din.onnx")).run(None, {"features": x})[0]
    with torch.no_grad():
        native = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, native, atol=1e-5)


def _interest_frame(seed: int = 4, users: int = 400, per_user: int = 24, days: int = 3) -> pd.DataFrame:
    """Each user's sequence comes from one of 8 interest clusters of authors; a candidate is
    engaged with when its author is in the user's cluster (mostly not an author of the sequence).
    Only the sequence says which cluster: the per-row features carry nothing. (Learning it with
    attention and not without: ``tests/unit/test_models_ablation.py``.)"""
    rng = np.random.default_rng(seed)
    clusters, authors_per = 8, 40
    cluster = rng.integers(0, clusters, users)
    rows = []
    for d in range(days):
        for u in range(users):
            seq_authors = cluster[u] * authors_per + rng.integers(0, authors_per, 6)
            seq_posts = seq_authors * 100 + rng.integers(0, 100, 6)
            seq = sequence_bucket_rows(seq_posts, seq_authors)
            cand_cluster = np.where(rng.random(per_user) < 0.5, cluster[u], rng.integers(0, clusters, per_user))
            cand_authors = cand_cluster * authors_per + rng.integers(0, authors_per, per_user)
            cand_posts = cand_authors * 100 + rng.integers(0, 100, per_user)
            p = np.where(cand_cluster == cluster[u], 0.6, 0.15)
            frame = pd.DataFrame(np.broadcast_to(seq, (per_user, len(seq))), columns=list(SEQUENCE_ID_FEATURES))
            frame["f0"] = rng.normal(size=per_user)
            frame["id_post_bucket"] = _bucket("id_post_bucket", cand_posts)
            frame["id_author_bucket"] = _bucket("id_author_bucket", cand_authors)
            for h in HEADS:
                frame[h] = (rng.random(per_user) < p).astype(np.int64)
            frame["date"] = 20220101 + d
            rows.append(frame)
    return pd.concat(rows, ignore_index=True)
