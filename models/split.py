"""Time-based splits of a training set by its local calendar day (``date``, int yyyymmdd).

Splitting by day, not at random, keeps the evaluation honest: a ranker is always scored on days
after the ones it learned from, as in production, and point-in-time features of a validation row
never summarise a training row's future.
"""

from __future__ import annotations

import pandas as pd


def _days(df: pd.DataFrame) -> list[int]:
    if "date" not in df.columns:
        raise KeyError(
            "frame has no 'date' column (local calendar day, int yyyymmdd); training sets must "
            "carry it through from the impression log"
        )
    if df["date"].isna().any():
        raise ValueError("column 'date' has missing values; every impression needs its day")
    return sorted(int(d) for d in pd.unique(df["date"]))


def split_by_days(df: pd.DataFrame, valid_days: int = 2) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, valid): the last ``valid_days`` distinct ``date`` values are validation.

    Args:
        df: a training set with an int ``date`` column (yyyymmdd).
        valid_days: number of latest distinct days to hold out, >= 1.

    Returns:
        ``(train, valid)``: copies of the rows, index preserved, original row order.

    Raises:
        KeyError: no ``date`` column.
        ValueError: ``valid_days < 1`` or fewer than ``valid_days + 1`` distinct days (training
            would be empty).
    """
    if valid_days < 1:
        raise ValueError(f"valid_days must be >= 1, got {valid_days}")
    days = _days(df)
    if len(days) <= valid_days:
        raise ValueError(
            f"need more than {valid_days} distinct days to hold out {valid_days} for validation, "
            f"the frame has {len(days)}: {days}"
        )
    first_valid = days[-valid_days]
    is_valid = df["date"].astype("int64") >= first_valid
    return df.loc[~is_valid].copy(), df.loc[is_valid].copy()


def split_calibration_day(train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a training set into (fit, calibration): the last day is the calibration slice.

    The calibration slice serves early stopping (both rankers) and Platt scaling (heavy ranker).

    Raises:
        KeyError: no ``date`` column.
        ValueError: fewer than 2 distinct days.
    """
    days = _days(train)
    if len(days) < 2:
        raise ValueError(
            f"training needs at least 2 distinct days (the last one is the early-stopping and "
            f"calibration slice), the frame has {len(days)}: {days}"
        )
    return split_by_days(train, valid_days=1)


def held_out_days(impressions: pd.DataFrame, n_days: int, skip_last: int = 0) -> tuple[list[int], pd.Timestamp]:
    """The ``n_days`` dates before the log's last ``skip_last`` ones, and their start: the first
    impression of those dates.

    The one cutoff rule of every as-of job: the whole funnel evaluates the last ``valid_days``
    (``skip_last=0``) from a store built before their start; the candidate-set light ranker is
    labelled by the ``horizon_days`` before them (``skip_last=valid_days``); the two-tower trains on
    everything before the validation days' start.

    Args:
        impressions: canonical impressions with ``date`` (int yyyymmdd) and ``event_ts``.
        n_days: dates returned (>= 1); skip_last: dates at the end of the log left out (>= 0).

    Returns:
        (the dates, ascending; the cutoff, tz-aware UTC).

    Raises:
        ValueError: ``n_days < 1``, ``skip_last < 0``, or the log has no date before the returned ones.
        KeyError: ``date`` or ``event_ts`` missing.
    """
    days = sorted(int(d) for d in pd.unique(impressions["date"]))
    if n_days < 1 or skip_last < 0 or len(days) <= n_days + skip_last:
        raise ValueError(f"need more than {n_days + skip_last} dates for {n_days} date(s) before the last "
                         f"{skip_last}; the log has {days}")
    chosen = days[len(days) - skip_last - n_days:len(days) - skip_last]
    ts = pd.to_datetime(impressions.loc[impressions["date"].isin(chosen), "event_ts"], utc=True)
    return chosen, ts.min()
