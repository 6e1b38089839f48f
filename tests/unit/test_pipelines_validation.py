"""monitoring.validation: suites pass on real data and stop the job naming file, column, expectation."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from core.state import StateDir
from pipelines.raw import LOG_FILE, USERS_FILE, VIDEOS_FILE, load_raw
from monitoring.validation import DATE_LAG_COLUMN, REPORT_NAME, DataValidationError, validate_raw


@pytest.fixture(scope="module")
def raw_slice(data_dir):
    """The real files, the log cut to its first 2,000 rows (validation cost grows with rows)."""
    raw = load_raw(data_dir)
    return dataclasses.replace(raw, log=raw.log.head(2000).copy())


def test_real_data_passes_and_report_is_written(raw_slice, tmp_path):
    state = StateDir(tmp_path).ensure()
    report = validate_raw(raw_slice, state.reports)
    assert report.success and len(report.outcomes) > 50
    written = json.loads((state.reports / REPORT_NAME).read_text())
    assert written["success"] is True and written["failed"] == 0
    assert written["rows"][LOG_FILE] == len(raw_slice.log)


def test_broken_frames_name_file_column_expectation_and_rows(raw_slice, tmp_path):
    log = raw_slice.log.copy()
    log.loc[[3, 9, 11], "is_click"] = 2                  # label outside {0, 1}
    log.loc[5, "date"] = 20210101                        # date far from the day of time_ms
    log.loc[7, "time_ms"] = 1_000                        # 1970: a seconds/ms mix-up
    users = raw_slice.users.copy()
    users.loc[[0, 1], "user_id"] = users.loc[2, "user_id"]  # duplicate ids
    videos = raw_slice.videos.drop(columns=["author_id"])
    broken = dataclasses.replace(raw_slice, log=log, users=users, videos=videos)
    state = StateDir(tmp_path).ensure()

    with pytest.raises(DataValidationError) as err:
        validate_raw(broken, state.reports)
    msg = str(err.value)
    lines = msg.splitlines()

    def line_for(file, column, expectation):
        hits = [ln for ln in lines if file in ln and f"'{column}'" in ln and expectation in ln]
        assert hits, f"no failure line for {file}/{column}/{expectation} in:\n{msg}"
        return hits[0]

    assert "3 bad rows" in line_for(LOG_FILE, "is_click", "expect_column_values_to_be_in_set")
    assert "[2, 2, 2]" in line_for(LOG_FILE, "is_click", "expect_column_values_to_be_in_set")
    assert "1 bad rows" in line_for(LOG_FILE, "time_ms", "expect_column_values_to_be_between")
    line_for(LOG_FILE, DATE_LAG_COLUMN, "expect_column_values_to_be_between")
    assert "3 bad rows" in line_for(USERS_FILE, "user_id", "expect_column_values_to_be_unique")
    line_for(VIDEOS_FILE, "author_id", "expect_column_to_exist")
    # the failing report is kept for inspection
    report = json.loads((state.reports / REPORT_NAME).read_text())
    assert report["success"] is False and report["failed"] == len(err.value.report.failures())


def test_wrong_dtype_and_nulls_are_reported(raw_slice):
    videos = raw_slice.videos.copy()
    videos["video_id"] = videos["video_id"].astype("float64")
    videos.loc[4, "video_id"] = float("nan")
    with pytest.raises(DataValidationError) as err:
        validate_raw(dataclasses.replace(raw_slice, videos=videos))
    failed = {(o.file, o.column, o.expectation) for o in err.value.report.failures()}
    assert (VIDEOS_FILE, "video_id", "expect_column_values_to_be_of_type") in failed
    assert (VIDEOS_FILE, "video_id", "expect_column_values_to_not_be_null") in failed
    assert all(o.file == VIDEOS_FILE for o in err.value.report.failures())


def test_future_events_fail_against_given_now(raw_slice):
    now = pd.to_datetime(raw_slice.log["time_ms"].iloc[100], unit="ms", utc=True)
    with pytest.raises(DataValidationError, match="time_ms"):
        validate_raw(raw_slice, now=now)
