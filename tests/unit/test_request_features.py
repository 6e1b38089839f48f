import numpy as np
import pandas as pd
import pytest

from core.schema import (
    HEAVY_RANKER_FEATURES, HOME_SURFACE, KNOWN_SURFACES, LIGHT_RANKER_FEATURES, REQUEST_FEATURES, SURFACE_FEATURES,
)
from core.request_features import add_request_features, surface_indicators


def test_request_features_per_row_times_are_local_and_relative():
    # 2022-05-03T16:30Z is 00:30 on Wednesday 2022-05-04 in Beijing (UTC+8).
    req = pd.Series(pd.to_datetime(["2022-05-03T16:30:00Z", "2022-05-03T20:00:00Z"], utc=True))
    created = pd.Timestamp("2022-04-10T16:00:00Z").value // 10**9
    frame = pd.DataFrame({"post_created_ts": [created, np.nan],
                          "tmp_last_impression_ts": [req[0].value // 10**9 - 90, np.nan]})
    out = add_request_features(frame, req, surface=1)
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
    out = add_request_features(frame, pd.Timestamp("1970-01-01T02:00:00Z"), surface=1)
    assert out["req_post_age_hours"].tolist() == [2.0, 1.0]
    assert out["req_hour_of_day"].tolist() == [10.0, 10.0]


def test_request_features_do_not_depend_on_the_timestamp_unit():
    # parquet round trips store microseconds; the result must equal the nanosecond one
    frame = pd.DataFrame({"post_created_ts": [1650000000], "tmp_last_impression_ts": [1651000000]})
    ns = pd.Series(pd.to_datetime(["2022-05-01T00:00:00Z"], utc=True))
    us = ns.astype("datetime64[us, UTC]")
    a, b = add_request_features(frame, ns, surface=1), add_request_features(frame, us, surface=1)
    pd.testing.assert_frame_equal(a, b)
    assert a["req_secs_since_last_impression"].iloc[0] == 1651363200 - 1651000000


def test_temporal_window_counts_empty_once_the_window_has_passed():
    last = pd.Timestamp("2022-05-01T00:00:00Z")
    frame = pd.DataFrame({"tmp_last_impression_ts": [last.value // 10**9] * 3,
                          "tmp_impressions_1h": [5.0] * 3, "tmp_impressions_24h": [9.0] * 3})
    req = pd.Series([last + pd.Timedelta(minutes=30), last + pd.Timedelta(hours=2), last + pd.Timedelta(days=2)])
    out = add_request_features(frame, req, surface=1)
    assert out["tmp_impressions_1h"].tolist() == [5.0, 0.0, 0.0]
    assert out["tmp_impressions_24h"].tolist() == [9.0, 9.0, 0.0]


REQ_TS = pd.Timestamp("2022-05-01T00:00:00Z")


def _surface_block(out: pd.DataFrame) -> np.ndarray:
    return out[list(SURFACE_FEATURES)].to_numpy()


def test_surface_features_are_request_features_of_both_rankers():
    assert set(SURFACE_FEATURES) <= set(REQUEST_FEATURES) and set(SURFACE_FEATURES) <= set(HEAVY_RANKER_FEATURES)
    assert {"req_surface_0", "req_surface_1", "req_surface_4"} <= set(LIGHT_RANKER_FEATURES)
    assert HOME_SURFACE in KNOWN_SURFACES and SURFACE_FEATURES[-1] == "req_surface_other"


@pytest.mark.parametrize("surface", KNOWN_SURFACES)
def test_each_known_surface_sets_exactly_its_indicator(surface):
    out = add_request_features(pd.DataFrame({"post_created_ts": [0, 1, 2]}), REQ_TS, surface=surface)
    for col in SURFACE_FEATURES:
        assert out[col].dtype == np.float64
        assert out[col].tolist() == [1.0 if col == f"req_surface_{surface}" else 0.0] * 3, col


@pytest.mark.parametrize("surface", [3, 5, 7, 14, 15, 10**6])
def test_unknown_surface_is_other(surface):
    out = add_request_features(pd.DataFrame({"post_created_ts": [0, 1]}), REQ_TS, surface=surface)
    assert out["req_surface_other"].tolist() == [1.0, 1.0]
    assert _surface_block(out).sum(axis=1).tolist() == [1.0, 1.0]


def test_scalar_and_series_forms_agree():
    tabs = [0, 1, 2, 3, 4, 5, 6, 11, 1]
    frame = pd.DataFrame({"post_created_ts": range(len(tabs))}, index=range(100, 100 + len(tabs)))
    per_row = add_request_features(frame, REQ_TS, surface=pd.Series(tabs, index=frame.index))
    for i, tab in enumerate(tabs):
        one = add_request_features(frame.iloc[[i]], REQ_TS, surface=tab)
        np.testing.assert_array_equal(_surface_block(per_row.iloc[[i]]), _surface_block(one))
    assert (_surface_block(per_row).sum(axis=1) == 1.0).all()
    # a Series is taken by position (a training set's tab column), not re-aligned by index
    by_position = add_request_features(frame, REQ_TS, surface=pd.Series(tabs))
    pd.testing.assert_frame_equal(per_row, by_position)


def test_missing_surface_means_home():
    frame = pd.DataFrame({"post_created_ts": [0, 1, 2]})
    home = _surface_block(add_request_features(frame, REQ_TS, surface=HOME_SURFACE))
    np.testing.assert_array_equal(_surface_block(add_request_features(frame, REQ_TS, surface=None)), home)
    gaps = pd.Series([np.nan, 1.0, np.nan])
    np.testing.assert_array_equal(_surface_block(add_request_features(frame, REQ_TS, surface=gaps)), home)
    nullable = pd.Series([pd.NA, 1, pd.NA], dtype="Int64")
    np.testing.assert_array_equal(_surface_block(add_request_features(frame, REQ_TS, surface=nullable)), home)


@pytest.mark.parametrize("bad, error", [(True, TypeError), (1.0, TypeError), ("1", TypeError), (-1, ValueError)])
def test_invalid_scalar_surface_is_rejected(bad, error):
    with pytest.raises(error, match="surface"):
        surface_indicators(bad, 2)


def test_surface_series_must_match_the_frame():
    with pytest.raises(ValueError, match="rows"):
        add_request_features(pd.DataFrame({"post_created_ts": [0, 1]}), REQ_TS, surface=pd.Series([1]))


def test_numpy_integer_surface_is_accepted():
    assert surface_indicators(np.int64(4), 1)["req_surface_4"].tolist() == [1.0]


def test_empty_frame():
    out = add_request_features(pd.DataFrame({"post_created_ts": []}), REQ_TS, surface=1)
    assert len(out) == 0 and set(SURFACE_FEATURES) <= set(out.columns)
