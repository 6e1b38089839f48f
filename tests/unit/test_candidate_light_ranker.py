"""The light ranker trained on candidate sets: user-disjoint early stopping, sampling weights, and
the training cutoff that keeps the labels before the evaluated days."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from home_mixer.candidate_training import training_cutoff
from models.light_ranker import LightRankerParams, fit_light_ranker_on_candidates, user_holdout
from models.metrics import gauc


def _candidates(n_users=300, per_user=60, seed=0):
    """Candidate sets where engagement depends on a history match and recent volume, not on a
    rate: the signal a candidate-set light ranker must pick up."""
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    f = pd.DataFrame({"user_id": np.repeat(np.arange(n_users), per_user),
                      "hist_coeng_sum": rng.exponential(1.0, n), "post_impressions_7d": rng.poisson(20, n) * 1.0,
                      "post_engagement_rate_total": rng.uniform(0, 1, n)})
    logit = -5.0 + 1.5 * f["hist_coeng_sum"] + 0.05 * f["post_impressions_7d"]
    f["engaged"] = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    f["weight"] = 1.0
    return f


def test_user_holdout_keeps_each_user_on_one_side():
    users = np.repeat(np.arange(50), 4)
    held = user_holdout(users, 0.2, seed=1)
    assert len(np.unique(users[held])) == 10
    assert not set(users[held]) & set(users[~held])
    assert (held == user_holdout(users, 0.2, seed=1)).all()  # seeded
    with pytest.raises(ValueError, match="0 < share < 1"):
        user_holdout(users, 1.0, seed=1)


def test_fit_on_candidates_learns_the_planted_signal_on_unseen_users():
    names = ("hist_coeng_sum", "post_impressions_7d", "post_engagement_rate_total")
    params = LightRankerParams(num_boost_round=60, early_stopping_rounds=10, min_data_in_leaf=20)
    fit = fit_light_ranker_on_candidates(_candidates(), params, names)
    assert fit.calibration_rows > 0 and fit.fit_rows > fit.calibration_rows and fit.best_iteration >= 1
    test = _candidates(n_users=200, seed=9)
    p = fit.predict(test)[:, 0]
    assert gauc(test["engaged"].to_numpy(), p, test["user_id"].to_numpy()) > 0.75
    gain = dict(zip(fit.feature_names, fit.booster.feature_importance("gain")))
    assert gain["hist_coeng_sum"] > gain["post_engagement_rate_total"]  # the noise feature matters least


def test_fit_on_candidates_errors_name_the_problem():
    frame = _candidates(n_users=20)
    names = ("hist_coeng_sum",)
    with pytest.raises(KeyError, match="label column 'click'"):
        fit_light_ranker_on_candidates(frame, feature_names=names, label="click")
    with pytest.raises(ValueError, match="single class"):
        fit_light_ranker_on_candidates(frame.assign(engaged=0), feature_names=names)


def test_training_cutoff_puts_the_label_days_before_the_evaluated_days():
    ts = pd.date_range("2022-04-25 16:00", periods=10, freq="D", tz="UTC")
    imp = pd.DataFrame({"date": [int(t.strftime("%Y%m%d")) for t in ts], "event_ts": ts + pd.Timedelta("1h")})
    days, cutoff = training_cutoff(imp, valid_days=2, horizon_days=2)
    assert days == [20220501, 20220502]
    assert cutoff == ts[6] + pd.Timedelta("1h")  # the first impression of the first label day
    with pytest.raises(ValueError, match="need more than 10 dates"):
        training_cutoff(imp, valid_days=2, horizon_days=8)
