"""models.features (feature matrices, input normalisation) and models.split (day splits)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from core.schema import ALL_FEATURES, HEADS
from tests.dev_frame import build_dev_frame
from models.features import InputNormalisation, MissingFeaturesError, feature_matrix
from models.heavy_ranker import HeavyRankerNet
from models.split import split_by_days, split_calibration_day


def test_feature_matrix_orders_columns_and_maps_missing_values_to_nan():
    frame = pd.DataFrame({
        "b": pd.array([1, None, 3], dtype="Int64"),      # pandas nullable, as Feast may return
        "a": [0.5, np.inf, -1.0],
        "c": pd.Series([2, None, 4], dtype=object),      # object with None
        "extra": ["x", "y", "z"],                        # ignored
    })
    x = feature_matrix(frame, ["a", "b", "c"])
    assert x.dtype == np.float32 and x.shape == (3, 3) and x.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(x[0], [0.5, 1, 2])
    assert np.isnan(x[1]).all()  # inf, <NA>, None
    np.testing.assert_array_equal(x[2], [-1, 3, 4])


def test_feature_matrix_of_a_float_frame_equals_the_column_by_column_path():
    # the mixer's frames are one float64 block, converted at once; any other frame goes column by column
    rng = np.random.default_rng(3)
    block = rng.normal(size=(50, 6))
    block[rng.random(block.shape) < 0.2] = np.nan
    block[0, 1], block[1, 2] = np.inf, -np.inf
    floats = pd.DataFrame(block, columns=list("abcdef"))
    mixed = floats.astype({"c": object, "e": "Float64"})
    names = ["f", "a", "c", "b", "e"]
    x = feature_matrix(floats, names)
    assert x.dtype == np.float32 and x.flags["C_CONTIGUOUS"] and np.isnan(x[0, 3]) and np.isnan(x[1, 2])
    np.testing.assert_array_equal(x, feature_matrix(mixed, names))
    np.testing.assert_array_equal(x[:, 1], np.where(np.isfinite(block[:, 0]), block[:, 0], np.nan).astype(np.float32))
    # the three fast paths agree: an all-float frame (whole block), floats beside a non-float column
    # (selected columns only), repeated column names (by name)
    with_dates = floats.assign(date=pd.Timestamp("2022-05-03"), label="x")
    np.testing.assert_array_equal(x, feature_matrix(with_dates, names))
    repeated = pd.concat([floats, floats[["a"]]], axis=1)
    assert not repeated.columns.is_unique
    np.testing.assert_array_equal(x[:, [0, 2, 3]], feature_matrix(repeated, ["f", "c", "b"]))


def test_feature_matrix_lists_every_missing_column():
    with pytest.raises(MissingFeaturesError) as err:
        feature_matrix(pd.DataFrame({"a": [1.0]}), ["a", "user_click_rate", "post_likes_7d"])
    assert "user_click_rate" in str(err.value) and "post_likes_7d" in str(err.value)


def test_feature_matrix_rejects_strings():
    with pytest.raises(TypeError, match="'s'"):
        feature_matrix(pd.DataFrame({"s": ["1.5", "high"]}), ["s"])


def test_normalisation_decides_log1p_from_training_data():
    rng = np.random.default_rng(0)
    n = 5000
    x = np.column_stack([
        rng.pareto(1.5, n) * 10,           # heavy-tailed count -> log1p
        rng.random(n),                     # rate in [0, 1] -> no log1p
        rng.normal(0, 1, n),               # takes negatives -> no log1p
        np.full(n, 3.0),                   # constant -> std 1
        np.full(n, np.nan),                # never observed -> median 0
    ]).astype(np.float32)
    x[::10, 0] = np.nan
    norm = InputNormalisation.fit(x, ["count", "rate", "signed", "const", "empty"])
    assert norm.log1p_features() == ["count"]
    assert norm.median[0] == pytest.approx(np.nanmedian(x[:, 0]), rel=1e-5)
    assert norm.median[4] == 0 and norm.std[3] == 1
    z = norm.transform(x)
    assert not np.isnan(z).any()
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=0.05)
    assert np.abs(z).max() <= norm.clip


def test_module_normalisation_equals_numpy_transform():
    rng = np.random.default_rng(1)
    x = rng.exponential(5, (500, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.1] = np.nan
    norm = InputNormalisation.fit(x, list("abcd"))
    net = HeavyRankerNet(norm, HEADS)
    with torch.no_grad():
        torch_z = net.normalise(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(torch_z, norm.transform(x), rtol=1e-5, atol=1e-5)


def test_normalisation_rejects_wrong_width():
    with pytest.raises(ValueError, match="3 features"):
        InputNormalisation.fit(np.zeros((4, 2), np.float32), ["a", "b", "c"])


@pytest.fixture(scope="module")
def dev_frame(data_dir):
    return build_dev_frame(data_dir, user_sample_mod=8)


def test_dev_frame_has_the_training_set_contract(dev_frame):
    for col in ("user_id", "post_id", "author_id", "event_timestamp", "date", *HEADS, *ALL_FEATURES):
        assert col in dev_frame.columns, col
    assert str(dev_frame["event_timestamp"].dt.tz) == "UTC"
    # point in time: a user's first impression has no user history
    first = dev_frame.sort_values("event_timestamp").groupby("user_id").head(1)
    assert first["user_impressions"].isna().mean() > 0.5


def test_split_by_days_holds_out_the_last_days(dev_frame):
    train, valid = split_by_days(dev_frame, valid_days=2)
    days = sorted(dev_frame["date"].unique())
    assert sorted(valid["date"].unique()) == days[-2:]
    assert train["date"].max() < valid["date"].min()
    assert len(train) + len(valid) == len(dev_frame)
    fit, cal = split_calibration_day(train)
    assert sorted(cal["date"].unique()) == [days[-3]]
    assert len(fit) + len(cal) == len(train)


def test_split_errors_say_what_is_missing(dev_frame):
    one_day = dev_frame[dev_frame["date"] == dev_frame["date"].min()]
    with pytest.raises(ValueError, match="distinct days"):
        split_by_days(one_day, valid_days=1)
    with pytest.raises(ValueError, match="at least 2 distinct days"):
        split_calibration_day(one_day)
    with pytest.raises(KeyError, match="date"):
        split_by_days(dev_frame.drop(columns="date"))
