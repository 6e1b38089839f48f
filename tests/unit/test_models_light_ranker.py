"""Light ranker on a dev frame built from a slice of the real log."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import LIGHT_RANKER_FEATURES
from models import metrics as M
from tests.dev_frame import build_dev_frame
from models.features import MissingFeaturesError
from models.light_ranker import LightRankerParams, engaged_label, fit_light_ranker
from models.split import split_by_days


@pytest.fixture(scope="module")
def split(data_dir):
    return split_by_days(build_dev_frame(data_dir, user_sample_mod=4), valid_days=2)


# one thread: robust when other processes share the 2 cores
ONE_THREAD = LightRankerParams(num_threads=1)


@pytest.fixture(scope="module")
def fit(split):
    return fit_light_ranker(split[0], ONE_THREAD)


def test_engaged_is_any_positive_head_not_hate():
    frame = pd.DataFrame({
        "click": [0, 1, 0, 0], "long_view": [0, 0, 0, 0], "like": [0, 0, 0, 0],
        "follow": [0, 0, 1, 0], "comment": [0, 0, 0, 0], "forward": [0, 0, 0, 0], "hate": [1, 0, 0, 0],
    })
    np.testing.assert_array_equal(engaged_label(frame), [0, 1, 1, 0])


def test_ranks_validation_days_better_than_chance(fit, split):
    _, valid = split
    p = fit.predict(valid)
    assert p.shape == (len(valid), 1) and p.dtype == np.float32
    assert ((p > 0) & (p < 1)).all()
    y = engaged_label(valid)
    assert M.auc(y, p[:, 0]) > 0.65
    # calibrated enough to blend: mean prediction near the engagement rate
    assert p.mean() == pytest.approx(y.mean(), abs=0.05)


def test_is_cheap_and_early_stopped(fit, split):
    train, _ = split
    assert 1 <= fit.best_iteration <= LightRankerParams().num_boost_round
    assert fit.feature_names == LIGHT_RANKER_FEATURES
    assert fit.fit_rows + fit.calibration_rows == len(train)


def test_takes_missing_values_natively(fit):
    frame = pd.DataFrame(np.nan, index=range(2), columns=list(LIGHT_RANKER_FEATURES))
    assert np.isfinite(fit.predict(frame)).all()


def test_missing_feature_column_is_a_clear_error(fit, split):
    _, valid = split
    with pytest.raises(MissingFeaturesError, match="ua_engagements"):
        fit.predict(valid.drop(columns="ua_engagements"))


def test_training_is_deterministic(split):
    train, _ = split
    params = LightRankerParams(num_boost_round=20, num_threads=1)
    a = fit_light_ranker(train, params).predict(train.head(500))
    b = fit_light_ranker(train, params).predict(train.head(500))
    np.testing.assert_array_equal(a, b)


def test_prediction_threads_do_not_change_scores(fit, split):
    # the mixer predicts on scoring.threads (1) threads; the default is all cores
    from models.features import feature_matrix
    from models.light_ranker import predict_booster

    x = feature_matrix(split[1].head(2000), fit.feature_names)
    default = predict_booster(fit.booster, x)
    one = predict_booster(fit.booster, x, num_threads=1)
    assert one.shape == (len(x), 1) and np.isfinite(one).all()
    np.testing.assert_array_equal(one, default)


def test_an_incremental_update_adds_trees_to_the_booster_it_continues(fit, split):
    """``init_model``: the new booster holds the old trees, then up to num_boost_round new ones fit
    on the new days alone; it predicts differently from the old one, and it ranks the validation
    days at least about as well as the old one (the new days are the nearer past)."""
    train, valid = split
    days = sorted(train["date"].unique())
    newest = train[train["date"].isin(days[-3:])]  # the update's data: three days, the last early-stops
    params = LightRankerParams(num_boost_round=30, early_stopping_rounds=5, num_threads=1)
    updated = fit_light_ranker(newest, params, init_model=fit.booster)
    old_trees = fit.booster.num_trees()
    assert old_trees < updated.booster.num_trees() <= old_trees + 30
    assert updated.best_iteration > fit.best_iteration  # counted on from the old trees
    p_old, p_new = fit.predict(valid)[:, 0], updated.predict(valid)[:, 0]
    assert not np.allclose(p_old, p_new)
    y = engaged_label(valid)
    assert M.auc(y, p_new) > M.auc(y, p_old) - 0.01
    with pytest.raises(ValueError, match="train it in full instead"):
        fit_light_ranker(newest, params, feature_names=LIGHT_RANKER_FEATURES[:-1], init_model=fit.booster)
