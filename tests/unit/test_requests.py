"""Impressions grouped into requests, and the instant their features are frozen at (core/requests.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.requests import assign_requests, served_feature_ts


def _frame(rows):
    df = pd.DataFrame(rows, columns=["user_id", "tab", "t_s"])
    df["event_timestamp"] = pd.to_datetime(df["t_s"], unit="s", utc=True)
    return df


def test_requests_split_on_gap_user_and_surface_and_keep_row_order():
    df = _frame([
        (1, 0, 1000), (1, 0, 1100), (2, 0, 1050),   # user 2 is another request
        (1, 1, 1120),                               # another surface: another request
        (1, 0, 1100 + 1801),                        # past the 30 min gap: a new request
        (1, 0, 1100 + 1801 + 1800),                 # exactly the gap: same request
    ])
    out = assign_requests(df, gap_s=1800)
    assert list(out["t_s"]) == list(df["t_s"])  # original order kept
    rid = out["request_id"].to_numpy()
    assert rid[0] == rid[1] and rid[4] == rid[5]
    assert len({rid[0], rid[2], rid[3], rid[4]}) == 4
    starts = (out["request_ts"] - pd.Timestamp(0, tz="UTC")).dt.total_seconds().to_numpy()
    np.testing.assert_array_equal(starts, [1000, 1000, 1050, 1120, 2901, 2901])
    assert out["request_ts"].dtype == df["event_timestamp"].dtype


def test_requests_without_surface_column_and_empty_frame():
    df = _frame([(1, 0, 0), (1, 5, 10)]).drop(columns="tab")
    assert assign_requests(df)["request_id"].nunique() == 1
    empty = assign_requests(df.iloc[:0])
    assert len(empty) == 0 and empty["request_id"].dtype == np.int64


def test_bad_gap_and_missing_columns_raise():
    df = _frame([(1, 0, 0)])
    with pytest.raises(ValueError, match="gap"):
        assign_requests(df, gap_s=0)
    with pytest.raises(KeyError, match="user_id"):
        assign_requests(df.drop(columns="user_id"))


def test_served_feature_ts_is_the_last_materialisation_before_the_request():
    ts = pd.Series(pd.to_datetime(["2022-05-03 10:59:59.999", "2022-05-03 11:00:00.000", "2022-05-03 11:00:00.001"],
                                  utc=True))
    out = served_feature_ts(ts)
    assert list(out.dt.strftime("%H:%M:%S")) == ["10:00:00", "11:00:00", "11:00:00"]
    assert (out <= ts).all()
    with pytest.raises(ValueError, match="cadence"):
        served_feature_ts(ts, cadence_s=0)
