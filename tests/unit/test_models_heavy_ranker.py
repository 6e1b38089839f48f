"""Heavy ranker: learns a synthetic per-head signal, calibrates, exports to ONNX, is reproducible."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.schema import HEADS
from models import metrics as M
from models.features import InputNormalisation
from models.heavy_ranker import HeavyRankerNet, HeavyRankerParams, fit_heavy_ranker, fit_platt

FEATURES = [f"f{i}" for i in range(6)]
# skewed base rates, like the real log: two common heads, five rare ones
BASE_RATES = dict(zip(HEADS, (0.3, 0.2, 0.05, 0.01, 0.02, 0.01, 0.01)))
# one thread: the tests must stay fast when other processes share the 2 cores (OpenMP threads
# waiting on a descheduled sibling slow two-thread training down many times over)
SMALL = HeavyRankerParams(hidden=(64, 32), tower=16, max_epochs=8, patience=2, num_threads=1)


def _bias_for_rate(logit: np.ndarray, rate: float) -> float:
    lo, hi = -20.0, 20.0
    for _ in range(60):  # bisection on the mean probability
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.mean(1 / (1 + np.exp(-(logit + mid)))) < rate else (lo, mid)
    return (lo + hi) / 2


def synthetic_frame(per_day: int = 6000, days: int = 4, seed: int = 3) -> tuple[pd.DataFrame, dict]:
    """Features ~ N(0, 1) (f0 10% missing, f5 a heavy-tailed count); each head's label is
    Bernoulli(sigmoid(w_h . x + b_h)) with its own direction w_h and a bias for its base rate."""
    rng = np.random.default_rng(seed)
    n = per_day * days
    x = rng.normal(size=(n, len(FEATURES)))
    w = rng.normal(size=(len(HEADS), len(FEATURES)))
    w = 2.0 * w / np.linalg.norm(w, axis=1, keepdims=True)
    logits = x @ w.T
    frame = pd.DataFrame(x, columns=FEATURES)
    frame["f5"] = np.round(np.exp(2 * x[:, 5]))  # same signal, seen as a count
    frame.loc[rng.random(n) < 0.1, "f0"] = np.nan
    true_p = {}
    for j, head in enumerate(HEADS):
        p = 1 / (1 + np.exp(-(logits[:, j] + _bias_for_rate(logits[:, j], BASE_RATES[head]))))
        frame[head] = (rng.random(n) < p).astype(np.int64)
        true_p[head] = p
    frame["date"] = np.repeat(20220101 + np.arange(days), per_day)
    frame["user_id"] = rng.integers(0, 1500, n)
    return frame, true_p


@pytest.fixture(scope="module")
def trained():
    frame, true_p = synthetic_frame()
    last = frame["date"] == frame["date"].max()
    fit = fit_heavy_ranker(frame[~last], SMALL, feature_names=FEATURES)
    holdout = frame[last]
    return fit, holdout, {h: p[last.to_numpy()] for h, p in true_p.items()}


def test_learns_each_head_close_to_the_oracle(trained):
    fit, holdout, true_p = trained
    probs = fit.predict(holdout)
    assert probs.shape == (len(holdout), len(HEADS)) and probs.dtype == np.float32
    for j, head in enumerate(HEADS):
        y = holdout[head].to_numpy()
        ours, oracle = M.auc(y, probs[:, j]), M.auc(y, true_p[head])
        assert ours > 0.8, head
        assert ours > oracle - 0.05, (head, ours, oracle)


def test_calibration_reduces_ece_on_rare_heads(trained):
    fit, holdout, _ = trained
    calibrated = fit.predict(holdout)
    raw = fit.predict_uncalibrated(holdout)
    for j, head in enumerate(HEADS):
        if BASE_RATES[head] > 0.05:
            continue
        y = holdout[head].to_numpy()
        ece_cal = M.expected_calibration_error(y, calibrated[:, j])
        ece_raw = M.expected_calibration_error(y, raw[:, j])
        # pos_weight inflates raw probabilities; Platt scaling must remove most of that
        assert ece_cal < 0.5 * ece_raw, (head, ece_cal, ece_raw)
        assert calibrated[:, j].mean() == pytest.approx(y.mean(), rel=0.35, abs=0.003), head


def test_rare_heads_get_larger_positive_weights(trained):
    fit, _, _ = trained
    assert fit.pos_weight["follow"] > fit.pos_weight["like"] > fit.pos_weight["click"] >= 1.0
    assert max(fit.pos_weight.values()) <= SMALL.max_pos_weight
    assert 1 <= fit.best_epoch <= fit.epochs <= SMALL.max_epochs


def test_missing_values_and_counts_are_handled_inside_the_module(trained):
    fit, holdout, _ = trained
    assert "f5" in [n for n, flag in zip(fit.feature_names, fit.model.in_log1p.tolist()) if flag]
    all_missing = pd.DataFrame(np.nan, index=range(3), columns=FEATURES)
    probs = fit.predict(all_missing)
    assert np.isfinite(probs).all() and ((probs > 0) & (probs < 1)).all()


def test_module_exports_to_onnx_with_the_same_outputs(trained, tmp_path):
    import onnxruntime as ort

    fit, holdout, _ = trained
    x = holdout[FEATURES].to_numpy(dtype=np.float32)[:64]
    program = torch.onnx.export(
        fit.model.eval(), (torch.from_numpy(x[:4]),), dynamo=True,
        input_names=["features"], output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.save(str(tmp_path / "heavy.onnx"))
    out = ort.InferenceSession(str(tmp_path / "heavy.onnx")).run(None, {"features": x})[0]
    np.testing.assert_allclose(out, fit.predict(holdout.iloc[:64]), atol=1e-5)


def test_training_is_reproducible_with_a_seed():
    frame, _ = synthetic_frame(per_day=1500, days=3, seed=5)
    params = HeavyRankerParams(hidden=(16,), tower=8, max_epochs=2, patience=5, num_threads=1)
    a = fit_heavy_ranker(frame, params, feature_names=FEATURES).predict(frame)
    b = fit_heavy_ranker(frame, params, feature_names=FEATURES).predict(frame)
    np.testing.assert_array_equal(a, b)


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    frame, _ = synthetic_frame(per_day=500, days=2, seed=6)
    fit_heavy_ranker(frame, HeavyRankerParams(hidden=(8,), tower=4, max_epochs=1, num_threads=1),
                     feature_names=FEATURES)
    assert torch.get_num_threads() == before


def test_fit_platt_recovers_known_parameters():
    rng = np.random.default_rng(0)
    z = rng.normal(size=100_000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-(2.0 * z - 3.0)))).astype(int)
    a, b = fit_platt(z, y)
    assert a == pytest.approx(2.0, abs=0.08) and b == pytest.approx(-3.0, abs=0.08)


def test_fit_platt_without_positives_predicts_small_probabilities():
    z = np.linspace(-2, 2, 1000)
    a, b = fit_platt(z, np.zeros_like(z))
    p = 1 / (1 + np.exp(-(a * z + b)))
    assert np.isfinite([a, b]).all() and p.max() < 0.01


def test_untrained_module_is_identity_calibrated():
    norm = InputNormalisation.fit(np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32), list("abc"))
    net = HeavyRankerNet(norm, HEADS).eval()
    x = torch.zeros(2, 3)
    with torch.no_grad():
        np.testing.assert_allclose(net(x).numpy(), torch.sigmoid(net.logits(x)).numpy(), rtol=1e-6)


# --- MMoE + popularity-prior offset ---------------------------------------------------------

PRIOR_FEATURES = ["f0", "f1", *(f"post_{h}_rate_total" for h in HEADS[:5])]  # forward, hate: no prior


def _prior_net(n_experts: int = 3) -> tuple[HeavyRankerNet, np.ndarray]:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, len(PRIOR_FEATURES))).astype(np.float32)
    x[:, 2:] = rng.uniform(0, 0.3, size=(200, len(PRIOR_FEATURES) - 2))
    x[0, 3] = np.nan  # a missing prior: the training median stands in
    x[1, 4] = 0.0  # a zero prior: clipped to prior_eps
    norm = InputNormalisation.fit(x, PRIOR_FEATURES)
    torch.manual_seed(0)
    return HeavyRankerNet(norm, HEADS, hidden=(16,), tower=8, n_experts=n_experts).eval(), x


def test_mmoe_gates_sum_to_one_per_head():
    net, x = _prior_net(n_experts=3)
    with torch.no_grad():
        g = net.gate_weights(net.normalise(torch.from_numpy(x))).numpy()
    assert g.shape == (len(x), len(HEADS), 3)
    assert (g >= 0).all()
    np.testing.assert_allclose(g.sum(axis=-1), 1.0, atol=1e-6)


def test_untrained_or_zeroed_towers_output_the_calibrated_prior_offset():
    net, x = _prior_net()
    # random tower weights, then zero the towers' last layers: the residual is 0
    for t in net.towers:
        torch.nn.init.normal_(t[0].weight)
    for t in net.towers:
        torch.nn.init.zeros_(t[-1].weight)
        torch.nn.init.zeros_(t[-1].bias)
    a, b = np.linspace(0.5, 1.5, len(HEADS)), np.linspace(-1, 1, len(HEADS))
    net.set_calibration(a, b)
    with torch.no_grad():
        out = net(torch.from_numpy(x)).numpy()
    median = net.in_median.numpy()
    for j, head in enumerate(HEADS):
        col = f"post_{head}_rate_total"
        if col in PRIOR_FEATURES:
            k = PRIOR_FEATURES.index(col)
            rate = np.clip(np.where(np.isnan(x[:, k]), median[k], x[:, k]), 1e-4, 1 - 1e-4).astype(np.float64)
            offset = np.log(rate / (1 - rate))
        else:  # no prior column: no offset
            offset = np.zeros(len(x))
        expected = 1 / (1 + np.exp(-(a[j] * offset + b[j])))
        np.testing.assert_allclose(out[:, j], expected, rtol=1e-4, atol=1e-6, err_msg=head)
    # without calibration, an untrained net predicts the popularity lookup itself
    k = PRIOR_FEATURES.index("post_click_rate_total")
    fresh, _ = _prior_net()
    with torch.no_grad():
        p = fresh(torch.from_numpy(x)).numpy()[:, 0]
    np.testing.assert_allclose(p[2:], np.clip(x[2:, k], 1e-4, 1 - 1e-4), rtol=1e-4, atol=1e-6)


def test_prior_offset_can_be_switched_off():
    rng = np.random.default_rng(0)
    norm = InputNormalisation.fit(rng.uniform(0, 0.2, (50, len(PRIOR_FEATURES))).astype(np.float32), PRIOR_FEATURES)
    net = HeavyRankerNet(norm, HEADS, prior_offset=False)
    assert net.prior_mask.sum().item() == 0
    on = HeavyRankerNet(norm, HEADS)
    assert on.prior_mask.tolist() == [1.0] * 5 + [0.0] * 2


def test_prior_offset_model_exports_to_onnx_with_the_same_outputs(tmp_path):
    import onnxruntime as ort

    net, x = _prior_net()
    for t in net.towers:  # non-trivial residuals
        torch.nn.init.normal_(t[-1].weight, std=0.3)
    net.set_calibration(np.full(len(HEADS), 0.9), np.full(len(HEADS), -0.2))
    program = torch.onnx.export(
        net.eval(), (torch.from_numpy(x[:4]),), dynamo=True,
        input_names=["features"], output_names=["probabilities"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
    )
    program.save(str(tmp_path / "heavy.onnx"))
    out = ort.InferenceSession(str(tmp_path / "heavy.onnx")).run(None, {"features": x})[0]
    with torch.no_grad():
        native = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, native, atol=1e-5)


# --- hashed id embeddings and the out-of-vocabulary bucket --------------------------------------

def _id_net(vocab_min: int = 3) -> tuple[HeavyRankerNet, np.ndarray, list[str]]:
    from models.heavy_ranker import id_vocabulary

    names = ["f0", "id_user_bucket", "id_post_bucket"]
    rng = np.random.default_rng(2)
    x = np.c_[rng.normal(size=40), np.r_[np.full(30, 5.0), np.arange(10) + 100.0], np.full(40, 7.0)].astype(np.float32)
    norm = InputNormalisation.fit(x, names)
    torch.manual_seed(0)
    net = HeavyRankerNet(norm, HEADS, hidden=(8,), tower=4, id_vocab=id_vocabulary(x, names, vocab_min)).eval()
    return net, x, names


def test_rare_and_missing_ids_share_the_out_of_vocabulary_embedding():
    net, x, _ = _id_net()
    assert net.id_features == ("id_user_bucket", "id_post_bucket")
    with torch.no_grad():
        emb = net.id_embeddings[0].weight
        users = net.embed_ids(torch.tensor([[0.0, 5.0, 7.0], [0.0, 100.0, 7.0], [0.0, float("nan"), 7.0],
                                            [0.0, 9999.0, 7.0]]))[0]
    torch.testing.assert_close(users[0], emb[5])  # bucket 5 seen 30 times: its own row
    for row in users[1:]:  # seen once, missing, never seen: the OOV row 0
        torch.testing.assert_close(row, emb[0])


def test_id_columns_do_not_enter_the_dense_inputs():
    net, x, _ = _id_net()
    u = net.normalise(torch.from_numpy(x))
    assert torch.all(u[:, 1:] == 0) and torch.any(u[:, 0] != 0)
    assert net.inputs(torch.from_numpy(x)).shape == (len(x), 1 + 2 + 2 * 8)


def test_id_embedding_model_exports_to_onnx_with_the_same_outputs(tmp_path):
    import onnxruntime as ort

    net, x, _ = _id_net()
    for e in net.id_embeddings:
        torch.nn.init.normal_(e.weight, std=1.0)
    for t in net.towers:
        torch.nn.init.normal_(t[-1].weight, std=0.3)
    x[3, 1] = np.nan
    program = torch.onnx.export(net.eval(), (torch.from_numpy(x[:4]),), dynamo=True,
                                input_names=["features"], output_names=["probabilities"],
                                dynamic_shapes=({0: torch.export.Dim("batch")},))
    program.save(str(tmp_path / "ids.onnx"))
    out = ort.InferenceSession(str(tmp_path / "ids.onnx")).run(None, {"features": x})[0]
    with torch.no_grad():
        native = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, native, atol=1e-5)
    assert np.isfinite(out).all()


def test_id_embeddings_learn_a_per_id_effect_the_features_cannot_see():
    rng = np.random.default_rng(11)
    n_users, per_user, days = 200, 60, 3
    users = np.repeat(np.arange(n_users), per_user)
    user_effect = rng.normal(scale=2.0, size=n_users)
    rows = []
    for d in range(days):
        logit = user_effect[users] - 1.0
        frame = pd.DataFrame({"f0": rng.normal(size=len(users)), "user_id": users, "date": 20220101 + d})
        for h in HEADS:
            frame[h] = (rng.random(len(users)) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        rows.append(frame)
    frame = pd.concat(rows, ignore_index=True)
    from core.id_features import id_bucket

    frame["id_user_bucket"] = id_bucket(frame["user_id"].to_numpy(), 1 << 15, 0x5BD1E995)
    test = frame[frame["date"] == 20220103]
    with_ids = fit_heavy_ranker(frame[frame["date"] < 20220103], SMALL, feature_names=["f0", "id_user_bucket"])
    without = fit_heavy_ranker(frame[frame["date"] < 20220103], SMALL, feature_names=["f0"])
    auc_ids = M.auc(test["click"], with_ids.predict(test)[:, 0])
    auc_none = M.auc(test["click"], without.predict(test)[:, 0])
    assert auc_ids > 0.7 and auc_none < 0.55


# --- within-context softmax loss (optional) -----------------------------------------------------

def test_context_softmax_loss_matches_the_hand_formula():
    from models.heavy_ranker import context_softmax_loss

    z = torch.tensor([[2.0], [0.0], [1.0], [3.0], [0.5]])
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0], [0.0]])
    ctx = torch.tensor([0, 0, 0, 1, 2])  # context 1 and 2: one class only, ignored
    lse = torch.logsumexp(z[:3, 0], dim=0)
    expected = -((z[0, 0] - lse) + (z[2, 0] - lse)) / 2
    torch.testing.assert_close(context_softmax_loss(z, y, ctx), expected)
    # shifting a context's logits by a constant changes nothing: only the order inside it counts
    torch.testing.assert_close(context_softmax_loss(z + torch.tensor([[5.0]] * 3 + [[0.0]] * 2), y, ctx), expected)


def test_context_batches_keep_contexts_whole():
    from models.heavy_ranker import _context_batches

    ctx = np.repeat(np.arange(50), np.arange(50) % 7 + 1)
    batches = _context_batches(ctx, 40, torch.Generator().manual_seed(0))
    seen = np.concatenate([b.numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(len(ctx)))
    owner = {}
    for i, b in enumerate(batches):
        for c in set(ctx[b.numpy()].tolist()):
            assert owner.setdefault(c, i) == i


def test_ranking_loss_trains_and_keeps_heads_calibrated():
    frame, _ = synthetic_frame(per_day=3000, days=3)
    frame["request_id"] = np.arange(len(frame)) // 4
    last = frame["date"] == frame["date"].max()
    params = HeavyRankerParams(hidden=(32,), tower=8, max_epochs=4, patience=2, num_threads=1, rank_loss_weight=1.0)
    fit = fit_heavy_ranker(frame[~last], params, feature_names=FEATURES)
    p = fit.predict(frame[last])
    y = frame.loc[last, "click"].to_numpy()
    assert M.gauc(y, p[:, 0], frame.loc[last, "request_id"].to_numpy()) > 0.7
    assert M.expected_calibration_error(y, p[:, 0]) < 0.05
