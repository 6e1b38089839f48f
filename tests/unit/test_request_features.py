import numpy as np
import pandas as pd

from core.schema import REQUEST_FEATURES
from core.request_features import add_request_features


def test_request_features_per_row_times_are_local_and_relative():
    # 2022-05-03T16:30Z is 00:30 on Wednesday 2022-05-04 in Beijing (UTC+8).
    req = pd.Series(pd.to_datetime(["2022-05-03T16:30:00Z", "2022-05-03T20:00:00Z"], utc=True))
    created = pd.Timestamp("2022-04-10T16:00:00Z").value // 10**9
    frame = pd.DataFrame({"post_created_ts": [created, np.nan],
                          "tmp_last_impression_ts": [req[0].value // 10**9 - 90, np.nan]})
    out = add_request_features(frame, req)
    assert set(REQUEST_FEATURES) <= set(out.columns)
    assert out["req_hour_of_day"].tolist() == [0.0, 4.0]
    assert out["req_day_of_week"].tolist() == [2.0, 2.0]
    assert out["req_secs_since_last_impression"].iloc[0] == 90.0
    assert np.isnan(out["req_secs_since_last_impression"].iloc[1])
    assert out["req_post_age_hours"].iloc[0] == (req[0] - pd.Timestamp("2022-04-10T16:00:00Z")).total_seconds() / 3600
    assert np.isnan(out["req_post_age_hours"].iloc[1])
    assert "req_hour_of_day" not in frame.columns  # input untouched


def test_request_features_single_timestamp_broadcasts():
    frame = pd.DataFrame({"post_created_ts": [0, 3600]})
    out = add_request_features(frame, pd.Timestamp("1970-01-01T02:00:00Z"))
    assert out["req_post_age_hours"].tolist() == [2.0, 1.0]
    assert out["req_hour_of_day"].tolist() == [10.0, 10.0]


def test_request_features_do_not_depend_on_the_timestamp_unit():
    # parquet round trips store microseconds; the result must equal the nanosecond one
    frame = pd.DataFrame({"post_created_ts": [1650000000], "tmp_last_impression_ts": [1651000000]})
    ns = pd.Series(pd.to_datetime(["2022-05-01T00:00:00Z"], utc=True))
    us = ns.astype("datetime64[us, UTC]")
    a, b = add_request_features(frame, ns), add_request_features(frame, us)
    pd.testing.assert_frame_equal(a, b)
    assert a["req_secs_since_last_impression"].iloc[0] == 1651363200 - 1651000000


def test_temporal_window_counts_empty_once_the_window_has_passed():
    last = pd.Timestamp("2022-05-01T00:00:00Z")
    frame = pd.DataFrame({"tmp_last_impression_ts": [last.value // 10**9] * 3,
                          "tmp_impressions_1h": [5.0] * 3, "tmp_impressions_24h": [9.0] * 3})
    req = pd.Series([last + pd.Timedelta(minutes=30), last + pd.Timedelta(hours=2), last + pd.Timedelta(days=2)])
    out = add_request_features(frame, req)
    assert out["tmp_impressions_1h"].tolist() == [5.0, 0.0, 0.0]
    assert out["tmp_impressions_24h"].tolist() == [9.0, 9.0, 0.0]
