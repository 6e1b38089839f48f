"""monitoring.production.label_production_sample: the production sample's labels from the impressions
table, by the same as-of join as training from logged features (hand-placed impressions)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from monitoring.production import label_production_sample
from pipelines.logged_features import first_impressions

T0 = pd.Timestamp("2022-05-04T16:00:00.250Z")  # the request clock (as_of), with a sub-second part


def _sample() -> pd.DataFrame:
    """Five sampled candidates of two requests, as ``read_production_sample`` returns them."""
    return pd.DataFrame({
        "request_id": ["r1"] * 4 + ["r2"], "user_id": [7, 7, 7, 7, 8], "post_id": [10, 11, 12, 13, 14],
        "as_of": [T0.timestamp()] * 5, "score_click": [0.1, 0.2, 0.3, 0.4, 0.5],
    }, index=[3, 1, 4, 0, 2])  # any index: the result keeps it


def _impressions() -> pd.DataFrame:
    s = pd.Timedelta(seconds=1)
    rows = [  # (user, post, event_ts, click): one per hand-placed case
        (7, 10, T0 + 30 * s, 1),  # inside the window: labels post 10
        (7, 11, T0 - s, 1),  # before as_of: not this serve's impression
        (7, 12, T0 + 3600 * s, 1),  # at as_of + window: outside (the window is half-open)
        (7, 13, T0 + 600 * s, 0),  # two impressions: the first one labels
        (7, 13, T0 + 60 * s, 1),
        (9, 14, T0 + 10 * s, 1),  # another user's impression of post 14: not user 8's
    ]
    frame = pd.DataFrame(rows, columns=["user_id", "post_id", "event_ts", "click"])
    for h in HEADS[1:]:
        frame[h] = 0
    return frame


def test_each_candidate_takes_the_first_impression_in_its_window():
    sample = _sample()
    out = label_production_sample(sample, _impressions(), window_s=3600)
    assert list(out.index) == list(sample.index) and list(out["post_id"]) == [10, 11, 12, 13, 14]
    assert list(out["labelled"]) == [True, False, False, True, False]
    np.testing.assert_array_equal(out["click"].to_numpy(), [1.0, np.nan, np.nan, 1.0, np.nan])
    assert out["click"].dtype == np.float64 and out["labelled"].dtype == bool
    # unlabelled rows are kept, NaN in every head (not negatives); labelled ones carry every head
    assert out.loc[~out["labelled"], list(HEADS)].isna().all().all()
    assert (out.loc[out["labelled"], list(HEADS[1:])] == 0).all().all()
    assert "labelled" not in sample.columns and "click" not in sample.columns  # the input is not modified


def test_window_bounds_and_the_shared_join():
    imp = _impressions()
    # a wider window reaches the impression at as_of + 3600 s
    wide = label_production_sample(_sample(), imp, window_s=3601)
    assert list(wide["labelled"]) == [True, False, True, True, False]
    # an impression exactly at as_of labels it (as_of <= event_ts)
    at = imp.assign(event_ts=imp["event_ts"].where(imp["post_id"] != 11, T0))
    assert label_production_sample(_sample(), at, window_s=3600)["labelled"].tolist()[1]
    serves = pd.DataFrame({"user_id": [7, 7], "post_id": [13, 10], "as_of": [T0, T0]})
    joined = first_impressions(serves, imp, 3600, columns=["click"])
    assert list(joined["event_ts"]) == [T0 + pd.Timedelta(seconds=60), T0 + pd.Timedelta(seconds=30)]
    with pytest.raises(ValueError, match="> 0"):
        label_production_sample(_sample(), imp, window_s=0)
    with pytest.raises(KeyError, match="like"):
        label_production_sample(_sample(), imp.drop(columns=["like"]))


def test_an_empty_sample_stays_empty():
    empty = _sample().iloc[:0]
    out = label_production_sample(empty, _impressions())
    assert out.empty and {"labelled", *HEADS} <= set(out.columns)
