"""Load the raw KuaiRand-Pure files (impression log, users, videos, pre-log sequences) into pandas
with explicit dtypes.

Explicit dtypes make a file whose values do not fit (an id with a decimal point, a label that is
text) fail here, by name, instead of turning into float/object columns that break later stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

LOG_FILE = "log_standard_20220425_20220504.csv"
USERS_FILE = "user_features_pure.csv"
VIDEOS_FILE = "video_features_basic_pure.csv"
# Per-user history before the log (optional: a data folder without it has no pre-log history).
SEQUENCES_FILE = "user_sequences_upto_20220424.parquet"
SEQUENCE_COLUMNS: tuple[str, ...] = ("user_id", "history_len", "last_time_ms", "watch_seq", "like_seq",
                                     "long_watch_seq")

# Impression log: one row per video shown to a user; all columns are integers.
LOG_DTYPES: dict[str, str] = {
    c: "int64"
    for c in (
        "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow",
        "is_comment", "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms",
        "profile_stay_time", "comment_stay_time", "is_profile_enter", "is_rand", "tab",
    )
}

# onehot_feat4 and onehot_feat12..17 have missing values in the official file, hence float64.
_USER_FLOAT_ONEHOT = {4, 12, 13, 14, 15, 16, 17}
USERS_DTYPES: dict[str, str] = {
    "user_id": "int64",
    "user_active_degree": "string",
    "is_lowactive_period": "int64",
    "is_live_streamer": "int64",
    "is_video_author": "int64",
    "follow_user_num": "int64",
    "follow_user_num_range": "string",
    "fans_user_num": "int64",
    "fans_user_num_range": "string",
    "friend_user_num": "int64",
    "friend_user_num_range": "string",
    "register_days": "int64",
    "register_days_range": "string",
    **{f"onehot_feat{i}": ("float64" if i in _USER_FLOAT_ONEHOT else "int64") for i in range(18)},
}

# video_duration (ms), sizes and music_type have missing values, hence float64; tag is a
# comma-separated list of category ids kept as text.
VIDEOS_DTYPES: dict[str, str] = {
    "video_id": "int64",
    "author_id": "int64",
    "video_type": "string",
    "upload_dt": "string",
    "upload_type": "string",
    "visible_status": "float64",
    "video_duration": "float64",
    "server_width": "float64",
    "server_height": "float64",
    "music_id": "int64",
    "music_type": "float64",
    "tag": "string",
}


class RawDataMissingError(FileNotFoundError):
    """A raw input file is not where it was looked for."""


class RawDataParseError(ValueError):
    """A raw file exists but its values do not fit the expected dtypes."""


@dataclass(frozen=True)
class RawData:
    """The three raw frames and the files they came from.

    Attributes:
        log: impression log, columns ``LOG_DTYPES`` (int64), one row per impression, sorted as in
            the file (by ``time_ms``, epoch milliseconds).
        users: user features, columns ``USERS_DTYPES``, one row per user.
        videos: video features, columns ``VIDEOS_DTYPES``, one row per video.
        log_path, users_path, videos_path: the files read (``log_path``: the first log file).
        log_paths: every log file concatenated into ``log``, in order (empty means ``log_path``).
        sequences: the pre-log history (``SEQUENCE_COLUMNS``: per user ``history_len``,
            ``last_time_ms`` and the video-id lists ``watch_seq``/``like_seq``/``long_watch_seq``,
            oldest first), or None when the data folder has no ``SEQUENCES_FILE``.
    """

    log: pd.DataFrame
    users: pd.DataFrame
    videos: pd.DataFrame
    log_path: Path
    users_path: Path
    videos_path: Path
    log_paths: tuple[Path, ...] = ()
    sequences: pd.DataFrame | None = None

    @property
    def log_name(self) -> str:
        """File name(s) of the log, for reports: ``a.csv`` or ``a.csv + b.csv``."""
        return " + ".join(p.name for p in (self.log_paths or (self.log_path,)))


def read_csv_typed(path: Path, dtypes: dict[str, str]) -> pd.DataFrame:
    """Read one CSV with the given column dtypes.

    Raises:
        RawDataMissingError: ``path`` does not exist.
        RawDataParseError: a column's values do not fit its dtype (message names file and reason).
    """
    path = Path(path)
    if not path.is_file():
        raise RawDataMissingError(
            f"raw file {path.name} not found in {path.parent}; point HOME_MIXER_DATA (or data_dir) "
            f"at the folder holding the KuaiRand-Pure files ({LOG_FILE}, {USERS_FILE}, {VIDEOS_FILE})"
        )
    try:
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, dtype={c: t for c, t in dtypes.items() if c in header})
    except (ValueError, TypeError) as exc:
        raise RawDataParseError(
            f"{path.name}: values do not fit the expected dtypes ({exc}); expected {dtypes}"
        ) from exc


def load_raw(data_dir: Path | str, log_path: Path | str | None = None,
             log_paths: list[Path] | tuple[Path, ...] | None = None) -> RawData:
    """Load the impression log, users and videos of KuaiRand-Pure.

    Args:
        data_dir: folder with ``user_features_pure.csv``, ``video_features_basic_pure.csv`` and
            (unless a log is given) ``log_standard_20220425_20220504.csv``.
        log_path: another log file of the same schema (e.g. later days for evaluation).
        log_paths: several log files of the same schema, concatenated in order (e.g. a history
            log and the log to evaluate); rows repeated across them are removed later by
            ``pipelines.canonical.deduplicate_log``. Give ``log_path`` or ``log_paths``, not both.

    Returns:
        ``RawData`` with typed frames. Columns missing from a file are not added here; the
        validation suites (``monitoring.validation``) report them.

    Raises:
        RawDataMissingError: a file is absent (the message names the file and the folder).
        RawDataParseError: a file's values do not fit the dtypes.
        ValueError: both ``log_path`` and ``log_paths`` given, or ``log_paths`` empty.
    """
    data_dir = Path(data_dir)
    if log_path is not None and log_paths is not None:
        raise ValueError("give log_path or log_paths, not both")
    if log_paths is not None and len(log_paths) == 0:
        raise ValueError("log_paths is empty; pass None to use the default log")
    if log_paths is not None:
        log_files = tuple(Path(p) for p in log_paths)
    else:
        log_files = (Path(log_path) if log_path is not None else data_dir / LOG_FILE,)
    logs = [read_csv_typed(p, LOG_DTYPES) for p in log_files]
    users_file, videos_file = data_dir / USERS_FILE, data_dir / VIDEOS_FILE
    return RawData(
        log=logs[0] if len(logs) == 1 else pd.concat(logs, ignore_index=True),
        users=read_csv_typed(users_file, USERS_DTYPES),
        videos=read_csv_typed(videos_file, VIDEOS_DTYPES),
        log_path=log_files[0],
        users_path=users_file,
        videos_path=videos_file,
        log_paths=log_files,
        sequences=read_sequences(data_dir / SEQUENCES_FILE),
    )


def read_sequences(path: Path) -> pd.DataFrame | None:
    """The pre-log sequences file, or None if it does not exist.

    Raises:
        RawDataParseError: the file lacks a column of ``SEQUENCE_COLUMNS`` or is not parquet.
    """
    if not path.is_file():
        return None
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise RawDataParseError(f"{path.name}: not a readable parquet file ({exc})") from exc
    missing = [c for c in SEQUENCE_COLUMNS if c not in frame.columns]
    if missing:
        raise RawDataParseError(f"{path.name}: lacks columns {missing}; expected {list(SEQUENCE_COLUMNS)}")
    return frame[list(SEQUENCE_COLUMNS)]
