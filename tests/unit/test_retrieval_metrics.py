"""models.retrieval_metrics: recall / hit rate / NDCG at K, coverage, bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.retrieval_metrics import bootstrap_mean_interval, per_user_metrics, summarize_order


def test_recall_hit_and_ndcg_by_hand():
    lists = [[1, 2, 3, 4], [9, 8]]
    positives = [{2, 4, 7}, {5}]
    m = per_user_metrics(lists, positives, ks=(1, 2, 4))
    assert m.ks == (1, 2, 4)
    # user 0: hits at ranks 1 and 3 (0-based) of 3 positives
    assert m.recall[0].tolist() == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3)]
    assert m.hit[0].tolist() == [0.0, 1.0, 1.0]
    d = [1 / math.log2(i + 2) for i in range(4)]
    assert m.ndcg[0, 1] == pytest.approx(d[1] / (d[0] + d[1]))
    assert m.ndcg[0, 2] == pytest.approx((d[1] + d[3]) / (d[0] + d[1] + d[2]))
    # user 1: no hit at all; a list shorter than K counts what it has
    assert m.recall[1].tolist() == [0.0, 0.0, 0.0] and m.ndcg[1].tolist() == [0.0, 0.0, 0.0]
    assert m.list_len.tolist() == [4, 2]
    assert m.top[1] == {1, 9} and m.top[4] == {1, 2, 3, 4, 8, 9}


def test_perfect_list_scores_one_and_order_matters_for_ndcg_only():
    pos = [{5, 6}]
    best = per_user_metrics([[5, 6, 1]], pos, ks=(2, 3))
    worse = per_user_metrics([[1, 5, 6]], pos, ks=(2, 3))
    assert best.recall[0].tolist() == [1.0, 1.0] and best.ndcg[0].tolist() == [1.0, 1.0]
    assert worse.recall[0, 1] == 1.0 and worse.ndcg[0, 1] < 1.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="no positives"):
        per_user_metrics([[1]], [set()])
    with pytest.raises(ValueError, match="one of each per user"):
        per_user_metrics([[1], [2]], [{1}])
    with pytest.raises(ValueError, match="K must be >= 1"):
        per_user_metrics([[1]], [{1}], ks=(0,))


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_users():
    rng = np.random.default_rng(0)
    small = rng.random(50)
    large = rng.random(5000)
    m_s, lo_s, hi_s = bootstrap_mean_interval(small, n_boot=500, seed=1)
    m_l, lo_l, hi_l = bootstrap_mean_interval(large, n_boot=500, seed=1)
    assert lo_s < m_s < hi_s and lo_l < m_l < hi_l
    assert m_s == pytest.approx(small.mean())
    assert (hi_l - lo_l) < (hi_s - lo_s) / 5  # ~ 1/sqrt(100) narrower
    # the standard error of a uniform mean is 1/sqrt(12 n): a 95 % interval is ~ 3.92 of them wide
    assert (hi_l - lo_l) == pytest.approx(3.92 / math.sqrt(12 * 5000), rel=0.2)
    const = bootstrap_mean_interval(np.full((10, 2), 0.3), n_boot=50)
    assert np.allclose(const, 0.3)


def test_summary_has_coverage_and_intervals():
    m = per_user_metrics([[1, 2], [1, 3]], [{1}, {3}], ks=(1, 2))
    s = summarize_order("x", m, catalogue_size=10, n_boot=200)
    assert s.coverage == {1: 0.1, 2: 0.3}
    assert s.recall[1][0] == 0.5 and s.recall[2][0] == 1.0
    assert s.recall[1][1] <= 0.5 <= s.recall[1][2]
    d = s.to_dict()
    assert d["recall"]["2"][0] == 1.0 and d["hit_rate"]["1"][0] == 0.5 and d["users"] == 2
    with pytest.raises(ValueError, match="catalogue"):
        summarize_order("x", m, catalogue_size=0)
