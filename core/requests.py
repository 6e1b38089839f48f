"""Impressions grouped into requests, and the instant at which a request's features are frozen.

A logged impression is one post shown in one home-timeline request, but KuaiRand logs no request
id. A request is rebuilt as a user's impressions on one surface (``tab``) with no gap longer than
``gap_s`` between consecutive impressions (the session rule of the sequential-recommendation
literature, e.g. Hidasi et al. 2016, "Session-based Recommendations with Recurrent Neural
Networks", which cuts sessions at 30 minutes of inactivity; 30 min is the default here too).

Serving ranks every candidate of a request with the same user features, the ones the online store
held when the request started; the online store is filled by ``feast materialize`` once per
``MATERIALIZATION_CADENCE_S``. So the features a request was served with are the offline rows
stamped at or before ``served_feature_ts(request_ts)``: the last materialisation before the
request started. Training sets and evaluation join features at that instant ("train as served").
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# How often `feast materialize` copies the offline store into Redis (the demo and jobs: hourly).
MATERIALIZATION_CADENCE_S = 3600
# Default inactivity gap that ends a request (seconds).
REQUEST_GAP_S = 30 * 60


def assign_requests(frame: pd.DataFrame, gap_s: float = REQUEST_GAP_S, *, user_col: str = "user_id",
                    surface_col: str = "tab", ts_col: str = "event_timestamp") -> pd.DataFrame:
    """Add ``request_id`` (int64) and ``request_ts`` (the request's first impression time).

    Rows are grouped per (user, surface) in time order; a new request starts at a user's first
    impression on a surface, or after more than ``gap_s`` seconds without one. Rows with the same
    timestamp stay in one request.

    Args:
        frame: impressions with ``user_col`` (int), ``surface_col`` (int; absent means one
            surface) and ``ts_col`` (datetime64, tz-aware or naive UTC).
        gap_s: inactivity gap in seconds, > 0.

    Returns:
        A copy of ``frame`` in its original row order with ``request_id`` (0..R-1, numbered in
        (user, surface, start time) order) and ``request_ts`` (same dtype as ``ts_col``).

    Raises:
        ValueError: ``gap_s`` is not positive; KeyError: a needed column is missing.
    """
    if not gap_s > 0:
        raise ValueError(f"request gap must be > 0 seconds, got {gap_s}")
    missing = [c for c in (user_col, ts_col) if c not in frame.columns]
    if missing:
        raise KeyError(f"cannot group impressions into requests: column(s) {missing} missing")
    n = len(frame)
    out = frame.copy()
    if n == 0:
        out["request_id"] = np.empty(0, dtype=np.int64)
        out["request_ts"] = out[ts_col]
        return out
    user = out[user_col].to_numpy()
    surface = out[surface_col].to_numpy() if surface_col in out.columns else np.zeros(n, dtype=np.int64)
    ts = pd.to_datetime(out[ts_col], utc=True)
    ts_s = (ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    ts_s = ts_s.to_numpy(dtype=np.float64)
    order = np.lexsort((ts_s, surface, user))
    u, s, t = user[order], surface[order], ts_s[order]
    new = np.ones(n, dtype=bool)
    new[1:] = (u[1:] != u[:-1]) | (s[1:] != s[:-1]) | ((t[1:] - t[:-1]) > gap_s)
    rid_sorted = np.cumsum(new) - 1
    start_pos = np.flatnonzero(new)[rid_sorted]
    request_id = np.empty(n, dtype=np.int64)
    request_id[order] = rid_sorted
    start_idx = np.empty(n, dtype=np.int64)
    start_idx[order] = order[start_pos]
    out["request_id"] = request_id
    out["request_ts"] = out[ts_col].iloc[start_idx].set_axis(out.index)
    return out


def served_feature_ts(request_ts: pd.Series, cadence_s: int = MATERIALIZATION_CADENCE_S) -> pd.Series:
    """The last materialisation at or before each request start: ``floor(request_ts, cadence_s)``.

    Offline rows stamped at or before this instant are what the online store held (a row is
    stamped after the events it aggregates, ``core.schema``), so a point-in-time join at this
    instant gives the features serving had.

    Args:
        request_ts: request start times (datetime64, tz-aware or naive UTC).
        cadence_s: materialisation period in seconds, > 0 (default hourly).

    Returns:
        tz-aware UTC datetimes, same index.

    Raises:
        ValueError: ``cadence_s`` is not positive.
    """
    if not cadence_s > 0:
        raise ValueError(f"materialisation cadence must be > 0 seconds, got {cadence_s}")
    ts = pd.to_datetime(request_ts, utc=True)
    return ts.dt.floor(f"{int(cadence_s)}s")
