"""Request-time features: computed from the request time and hydrated values, offline and online.

The same function serves training sets (request time = impression time) and the mixer (request time
= now), so the two cannot disagree on how, say, post age is measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# KuaiRand timestamps are Beijing time (UTC+8); hour of day and day of week are local.
LOCAL_UTC_OFFSET_HOURS = 8
TEMPORAL_WINDOWS_S = {"tmp_impressions_1h": 3600.0, "tmp_impressions_24h": 86400.0}


def add_request_features(frame: pd.DataFrame, request_ts: pd.Series | pd.Timestamp) -> pd.DataFrame:
    """Add ``core.schema.REQUEST_FEATURES`` columns to ``frame`` (a copy is returned).

    Args:
        frame: rows of hydrated features; reads ``post_created_ts`` and ``tmp_last_impression_ts``
            (epoch seconds, int64, may be missing/NaN for cold posts or users).
        request_ts: the request time per row (a datetime Series aligned with ``frame``) or one
            timestamp for all rows; tz-aware UTC or naive UTC.

    Returns:
        ``frame`` with float64 columns ``req_hour_of_day`` (0-23, local), ``req_day_of_week``
        (0 = Monday, local), ``req_secs_since_last_impression`` (seconds, NaN if no previous
        impression) and ``req_post_age_hours`` (hours since the post was created, NaN if unknown);
        ``tmp_impressions_1h`` / ``_24h`` set to 0 where the previous impression is at least that
        window before the request.
    """
    out = frame.copy()
    ts = pd.to_datetime(request_ts, utc=True)
    if isinstance(ts, pd.Timestamp):
        epoch_s = np.full(len(out), ts.value / 1e9)
        local = ts + pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)
        hour = np.full(len(out), float(local.hour))
        dow = np.full(len(out), float(local.dayofweek))
    else:
        ts = pd.Series(ts.values, index=out.index)
        # unit-free (parquet round trips turn ns into us): seconds since the epoch as float64
        epoch_s = ((ts - pd.Timestamp(0)) / pd.Timedelta(seconds=1)).to_numpy(dtype="float64")  # ts: naive UTC
        local = ts + pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)
        hour = local.dt.hour.to_numpy(dtype="float64")
        dow = local.dt.dayofweek.to_numpy(dtype="float64")
    last = pd.to_numeric(out.get("tmp_last_impression_ts"), errors="coerce") if "tmp_last_impression_ts" in out else np.nan
    created = pd.to_numeric(out.get("post_created_ts"), errors="coerce") if "post_created_ts" in out else np.nan
    out["req_hour_of_day"] = hour
    out["req_day_of_week"] = dow
    out["req_secs_since_last_impression"] = np.asarray(epoch_s - np.asarray(last, dtype="float64"), dtype="float64")
    out["req_post_age_hours"] = np.asarray((epoch_s - np.asarray(created, dtype="float64")) / 3600.0, dtype="float64")
    # tmp_impressions_<W> count the window ending at the user's previous impression; a request W or
    # more after it has an empty window (same rule offline and online, so the feature means the same).
    for col, window_s in TEMPORAL_WINDOWS_S.items():
        if col in out:
            stale = out["req_secs_since_last_impression"].to_numpy() >= window_s
            out[col] = np.where(stale, 0.0, pd.to_numeric(out[col], errors="coerce"))
    return out
