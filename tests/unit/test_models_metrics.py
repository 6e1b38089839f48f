"""models.metrics against scikit-learn and hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from models import metrics as M


@pytest.fixture()
def rng():
    return np.random.default_rng(42)


def test_auc_matches_sklearn_with_ties(rng):
    y = rng.integers(0, 2, 5000)
    p = np.round(rng.random(5000) * 0.5 + 0.3 * y, 2)  # rounding creates many ties
    assert M.auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_single_class_is_nan():
    assert math.isnan(M.auc([1, 1, 1], [0.1, 0.2, 0.3]))


def test_log_loss_matches_sklearn(rng):
    y = rng.integers(0, 2, 3000)
    p = np.clip(rng.random(3000), 0.01, 0.99)
    assert M.log_loss(y, p) == pytest.approx(sk_log_loss(y, p), rel=1e-10)


def test_log_loss_clips_confident_miss():
    assert M.log_loss([1], [0.0]) == pytest.approx(-math.log(1e-7))


def test_gauc_hand_case():
    # user a: perfect (AUC 1, 3 rows); user b: inverted (AUC 0, 2 rows); user c: one class, left out
    y = [1, 0, 0, 1, 0, 0, 0]
    p = [0.9, 0.5, 0.1, 0.2, 0.8, 0.3, 0.4]
    g = ["a", "a", "a", "b", "b", "c", "c"]
    assert M.gauc(y, p, g) == pytest.approx((3 * 1.0 + 2 * 0.0) / 5)


def test_gauc_ties_count_half():
    assert M.gauc([1, 0], [0.5, 0.5], [7, 7]) == pytest.approx(0.5)


def test_gauc_equals_weighted_sklearn_per_user(rng):
    n = 4000
    g = rng.integers(0, 300, n)
    y = rng.integers(0, 2, n)
    p = rng.random(n) + 0.2 * y
    num = den = 0.0
    for u in np.unique(g):
        m = g == u
        if 0 < y[m].sum() < m.sum():
            num += m.sum() * roc_auc_score(y[m], p[m])
            den += m.sum()
    assert M.gauc(y, p, g) == pytest.approx(num / den, abs=1e-12)


def test_gauc_without_eligible_user_is_nan():
    assert math.isnan(M.gauc([1, 0], [0.3, 0.4], [1, 2]))


def test_ece_hand_cases_both_strategies():
    y = [0, 1, 0, 1]
    p = [0.1, 0.2, 0.3, 0.9]
    # equal mass, 2 bins: {.1,.2} -> |.5-.15| ; {.3,.9} -> |.5-.6| ; each half the rows
    assert M.expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.5 * 0.35 + 0.5 * 0.1)
    # equal width, 2 bins: [0,.5) holds .1,.2,.3 -> |1/3 - .2| (3/4 of rows); [.5,1] holds .9 -> |1-.9|
    assert M.expected_calibration_error(y, p, n_bins=2, strategy="equal_width") == pytest.approx(
        0.75 * abs(1 / 3 - 0.2) + 0.25 * 0.1)


def test_ece_small_when_calibrated_large_when_not(rng):
    p = rng.beta(1, 20, 200_000)
    y = (rng.random(len(p)) < p).astype(int)
    assert M.expected_calibration_error(y, p) < 0.003
    # predictions doubled: ECE equals the mean over-prediction, about mean(p)
    assert M.expected_calibration_error(y, np.minimum(2 * p, 1)) == pytest.approx(p.mean(), rel=0.1)


def test_ndcg_hand_case():
    gain = [3, 2, 0, 1]
    score = [0.1, 0.9, 0.5, 0.3]  # ranks gains as 2, 0, 1, 3
    dcg = 2 / math.log2(2) + 0 + 1 / math.log2(4) + 3 / math.log2(5)
    idcg = 3 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert M.ndcg_at_k(gain, score, [1, 1, 1, 1], k=10) == pytest.approx(dcg / idcg)
    assert M.ndcg_at_k(gain, score, [1, 1, 1, 1], k=2) == pytest.approx(2 / (3 + 2 / math.log2(3)))


def test_ndcg_averages_users_with_gain_only():
    gain = [1, 0, 0, 0, 0, 1]
    score = [1, 0, 5, 4, 1, 0]  # user 1 perfect (1.0); user 2 has no gain; user 3 worst of 2
    groups = [1, 1, 2, 2, 3, 3]
    per_user = M.ndcg_per_user(gain, score, groups, k=10)
    assert list(per_user.index) == [1, 3]
    assert per_user[1] == pytest.approx(1.0)
    assert per_user[3] == pytest.approx(1 / math.log2(3))
    assert M.ndcg_at_k(gain, score, groups) == pytest.approx((1 + 1 / math.log2(3)) / 2)


def test_ndcg_ties_keep_input_order():
    # equal scores: the first row is ranked first
    assert M.ndcg_at_k([0, 1], [0.5, 0.5], [1, 1]) == pytest.approx(1 / math.log2(3))
    assert M.ndcg_at_k([1, 0], [0.5, 0.5], [1, 1]) == pytest.approx(1.0)


def test_ndcg_matches_sklearn_per_user(rng):
    from sklearn.metrics import ndcg_score

    n_users, n_items = 50, 12
    gain = rng.integers(0, 4, (n_users, n_items)).astype(float)
    score = rng.random((n_users, n_items))
    groups = np.repeat(np.arange(n_users), n_items)
    ours = M.ndcg_per_user(gain.ravel(), score.ravel(), groups, k=5)
    for u in ours.index[:10]:
        assert ours[u] == pytest.approx(ndcg_score(gain[u:u + 1], score[u:u + 1], k=5), abs=1e-12)


@pytest.mark.parametrize("bad", [
    lambda: M.auc([0, 2], [0.1, 0.2]),
    lambda: M.auc([0, 1], [0.1, float("nan")]),
    lambda: M.auc([0, 1], [0.1]),
    lambda: M.log_loss([0, 1], [0.1, 1.5]),
    lambda: M.expected_calibration_error([0, 1], [0.1, 0.2], strategy="quantile"),
    lambda: M.ndcg_at_k([-1, 1], [0.1, 0.2], [1, 1]),
    lambda: M.ndcg_at_k([1, 1], [0.1, 0.2], [1, 1], k=0),
])
def test_bad_input_raises_value_error(bad):
    with pytest.raises(ValueError):
        bad()


def test_group_aucs_give_one_half_to_a_group_with_one_shared_score():
    y = np.array([1, 0, 0, 1, 0, 1])
    p = np.array([0.3, 0.3, 0.3, 0.9, 0.1, 0.5])  # group "a": every row the same score
    parts = M.group_aucs(y, p, ["a", "a", "a", "b", "b", "c"])
    assert list(parts.index) == ["a", "b"]  # "c" has one class only
    assert parts.loc["a", "auc"] == 0.5 and parts.loc["b", "auc"] == 1.0
    assert M.gauc(y, p, ["a", "a", "a", "b", "b", "c"]) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)


def test_gauc_interval_covers_the_estimate_and_narrows_with_more_users():
    rng = np.random.default_rng(3)

    def sample(n_users):
        users = np.repeat(np.arange(n_users), 8)
        y = rng.integers(0, 2, len(users))
        p = y * 0.4 + rng.random(len(users))
        return y, p, users

    y, p, u = sample(200)
    lo, hi = M.gauc_interval(y, p, u, u, n_boot=300)
    assert lo < M.gauc(y, p, u) < hi
    y2, p2, u2 = sample(3000)
    lo2, hi2 = M.gauc_interval(y2, p2, u2, u2, n_boot=300)
    assert (hi2 - lo2) < (hi - lo) / 2


def test_gauc_interval_rejects_a_group_spanning_two_users():
    with pytest.raises(ValueError, match="spans several clusters"):
        M.gauc_interval([1, 0, 1, 0], [0.9, 0.1, 0.8, 0.2], [7, 7, 7, 7], [1, 1, 2, 2])


def test_gauc_difference_interval_is_paired():
    rng = np.random.default_rng(5)
    users = np.repeat(np.arange(400), 6)
    y = rng.integers(0, 2, len(users))
    noise = rng.random(len(users))
    better, worse = y * 0.13 + noise, y * 0.1 + noise  # same noise: the difference is consistent
    d, lo, hi = M.gauc_difference_interval(y, better, worse, users, users, n_boot=300)
    assert d == pytest.approx(M.gauc(y, better, users) - M.gauc(y, worse, users))
    assert 0 < lo < d < hi
    # each score's own interval overlaps the other's, yet the paired one excludes 0
    assert M.gauc_interval(y, worse, users, users, n_boot=300)[1] > M.gauc_interval(y, better, users, users, n_boot=300)[0]
    same = M.gauc_difference_interval(y, better, better, users, users, n_boot=100)
    assert same == (0.0, 0.0, 0.0)
    d2, lo2, hi2 = M.gauc_difference_interval(y, worse, better, users, users, n_boot=300)
    assert d2 == pytest.approx(-d) and hi2 < 0


def test_gauc_interval_is_unchanged_by_the_shared_bootstrap():
    # the percentile interval of one score, recomputed by hand from the same draws
    rng = np.random.default_rng(9)
    users = np.repeat(np.arange(60), 5)
    y = rng.integers(0, 2, len(users))
    p = y * 0.2 + rng.random(len(users))
    parts = M.group_aucs(y, p, users)
    draws = np.random.default_rng(0)
    stats = []
    for k in draws.binomial(60, len(parts) / 60, 50):
        idx = draws.integers(0, len(parts), k)
        stats.append((parts["n"].to_numpy()[idx] * parts["auc"].to_numpy()[idx]).sum() / parts["n"].to_numpy()[idx].sum())
    assert M.gauc_interval(y, p, users, users, n_boot=50, seed=0) == pytest.approx(tuple(np.quantile(stats, [0.025, 0.975])))
