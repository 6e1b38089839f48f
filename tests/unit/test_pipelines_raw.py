"""pipelines.raw: typed loading of the raw files and clear errors for missing or malformed ones."""

from __future__ import annotations

import shutil

import pytest

from pipelines.raw import (
    LOG_DTYPES,
    LOG_FILE,
    USERS_DTYPES,
    USERS_FILE,
    VIDEOS_DTYPES,
    VIDEOS_FILE,
    RawDataMissingError,
    RawDataParseError,
    load_raw,
)


def test_load_raw_gives_explicit_dtypes(data_dir):
    raw = load_raw(data_dir)
    for frame, dtypes in ((raw.log, LOG_DTYPES), (raw.users, USERS_DTYPES), (raw.videos, VIDEOS_DTYPES)):
        assert list(frame.columns) == list(dtypes)
        assert {c: str(frame[c].dtype) for c in frame.columns} == dtypes
    assert raw.log_path.name == LOG_FILE and len(raw.log) > 0


def test_missing_file_error_names_file_and_folder(tmp_path, data_dir):
    shutil.copy(data_dir / USERS_FILE, tmp_path / USERS_FILE)
    with pytest.raises(RawDataMissingError) as err:
        load_raw(tmp_path)
    assert LOG_FILE in str(err.value) and str(tmp_path) in str(err.value)


def test_other_log_file_by_path(tmp_path, data_dir):
    lines = (data_dir / LOG_FILE).read_text().splitlines()[:11]
    other = tmp_path / "later_days.csv"
    other.write_text("\n".join(lines) + "\n")
    raw = load_raw(data_dir, log_path=other)
    assert len(raw.log) == 10 and raw.log_path == other
    assert raw.log["time_ms"].dtype == "int64"


def test_malformed_values_raise_parse_error_naming_file(tmp_path, data_dir):
    for name in (USERS_FILE, VIDEOS_FILE):
        shutil.copy(data_dir / name, tmp_path / name)
    lines = (data_dir / LOG_FILE).read_text().splitlines()[:3]
    lines[2] = lines[2].replace(lines[2].split(",")[0], "not-a-user", 1)
    (tmp_path / LOG_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(RawDataParseError, match=LOG_FILE):
        load_raw(tmp_path)


def test_several_log_files_are_concatenated_in_order(tmp_path, data_dir):
    lines = (data_dir / LOG_FILE).read_text().splitlines()
    first, second = tmp_path / "history.csv", tmp_path / "later.csv"
    first.write_text("\n".join(lines[:6]) + "\n")
    second.write_text("\n".join([lines[0], *lines[4:9]]) + "\n")  # overlaps rows 4-5
    raw = load_raw(data_dir, log_paths=[first, second])
    assert len(raw.log) == 5 + 5 and raw.log_paths == (first, second)
    assert raw.log_name == "history.csv + later.csv"
    assert raw.log["time_ms"].is_monotonic_increasing is False  # the overlap repeats; canonical dedups
    with pytest.raises(ValueError, match="not both"):
        load_raw(data_dir, log_path=first, log_paths=[second])
