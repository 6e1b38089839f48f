"""Request-time features: computed from the request time, the request's surface and hydrated values,
offline and online.

The same function serves training sets (request time = the request's start, surface = the log's
``tab``) and the mixer (request time = now, surface = ``Query.surface``), so the two cannot disagree
on how, say, post age is measured or which surface a request was on.
"""

from __future__ import annotations

import numbers

import numpy as np
import pandas as pd

from core.schema import HOME_SURFACE, KNOWN_SURFACES

# KuaiRand timestamps are Beijing time (UTC+8); hour of day and day of week are local.
LOCAL_UTC_OFFSET_HOURS = 8
TEMPORAL_WINDOWS_S = {"tmp_impressions_1h": 3600.0, "tmp_impressions_24h": 86400.0}


def surface_indicators(surface: int | pd.Series | None, n: int) -> dict[str, np.ndarray]:
    """One-hot request features of the surface: ``core.schema.SURFACE_FEATURES`` -> float64 ``[n]``.

    The surface is request context, as in Twitter's home-mixer, whose query carries the request's
    product surface and client context (product-mixer ``Product`` / ``ClientContext``).

    Args:
        surface: the surface id (KuaiRand's ``tab``): one non-negative int for every row (a
            request), or a Series of ``n`` ids (one per row, offline). ``None`` (a log without a
            ``tab`` column) and NaN/``<NA>`` entries mean the home surface
            (``core.schema.HOME_SURFACE``), which is what the mixer assumes for a request that
            names no surface.
        n: number of rows.

    Returns:
        ``req_surface_<s>`` for each of ``KNOWN_SURFACES`` and ``req_surface_other``, each a float64
        array of 0/1 of shape ``[n]``; exactly one of them is 1 in every row. A surface id outside
        ``KNOWN_SURFACES`` (a rare tab, a new surface, a negative id in a log) sets ``other``.

    Raises:
        TypeError: a scalar ``surface`` that is not an integer (bools are rejected too).
        ValueError: a Series of another length than ``n``, or a negative scalar ``surface``.
    """
    if surface is None:
        codes = np.full(n, float(HOME_SURFACE))
    elif isinstance(surface, pd.Series):
        if len(surface) != n:
            raise ValueError(f"surface has {len(surface)} rows, the frame has {n}")
        codes = pd.to_numeric(surface, errors="raise").to_numpy(dtype="float64", na_value=np.nan)
        codes = np.where(np.isnan(codes), float(HOME_SURFACE), codes)
    else:
        if isinstance(surface, (bool, np.bool_)) or not isinstance(surface, numbers.Integral):
            raise TypeError(f"surface must be an int (a surface id), got {type(surface).__name__} {surface!r}")
        if surface < 0:
            raise ValueError(f"surface must be >= 0, got {surface}")
        codes = np.full(n, float(surface))
    out: dict[str, np.ndarray] = {}
    known = np.zeros(n, dtype=bool)
    for s in KNOWN_SURFACES:
        hit = codes == s
        known |= hit
        out[f"req_surface_{s}"] = hit.astype("float64")
    out["req_surface_other"] = (~known).astype("float64")
    return out


def add_request_features(frame: pd.DataFrame, request_ts: pd.Series | pd.Timestamp, *,
                         surface: int | pd.Series | None) -> pd.DataFrame:
    """Add ``core.schema.REQUEST_FEATURES`` columns to ``frame`` (a copy is returned).

    Args:
        frame: rows of hydrated features; reads ``post_created_ts`` and ``tmp_last_impression_ts``
            (epoch seconds, int64, may be missing/NaN for cold posts or users).
        request_ts: the request time per row (a datetime Series aligned with ``frame``) or one
            timestamp for all rows; tz-aware UTC or naive UTC.
        surface: the request's surface (KuaiRand ``tab``; request context, see
            ``surface_indicators``): one int for all rows (the mixer: ``Query.surface``) or a Series
            aligned with ``frame`` (training sets: their ``tab`` column). Required so no caller
            forgets it; ``None`` only for a log that records no surface (an older log without
            ``tab``): every row then counts as the home surface ``core.schema.HOME_SURFACE``.

    Returns:
        ``frame`` with the columns of ``request_feature_columns`` added or replaced.

    Raises:
        TypeError / ValueError: an invalid ``surface`` (see ``surface_indicators``).
    """
    out = frame.copy()
    for col, values in request_feature_columns(out, len(out), request_ts, surface=surface).items():
        out[col] = values
    return out


def request_feature_columns(columns, n: int, request_ts: pd.Series | pd.Timestamp, *,
                            surface: int | pd.Series | None) -> dict[str, np.ndarray]:
    """The request-time columns of ``n`` rows of hydrated features (``add_request_features`` adds
    them to a frame; the mixer builds its frame from them directly, one allocation per request).

    Args:
        columns: a DataFrame or a mapping of column name -> array ``[n]``; reads
            ``post_created_ts`` and ``tmp_last_impression_ts`` (epoch seconds, may be missing or
            NaN) and ``tmp_impressions_1h`` / ``_24h`` when present.
        n: the number of rows.
        request_ts, surface: as ``add_request_features``.

    Returns:
        float64 arrays ``[n]``: ``req_hour_of_day`` (0-23, local), ``req_day_of_week`` (0 = Monday,
        local), ``req_secs_since_last_impression`` (seconds, NaN if no previous impression),
        ``req_post_age_hours`` (hours since the post was created, NaN if unknown), the 0/1 surface
        indicators ``core.schema.SURFACE_FEATURES`` (one per known surface + ``req_surface_other``),
        and, for those of ``tmp_impressions_1h`` / ``_24h`` present, their values set to 0 where the
        previous impression is at least that window before the request.

    Raises:
        TypeError / ValueError: an invalid ``surface`` (see ``surface_indicators``).
    """
    indicators = surface_indicators(surface, n)  # by position: a Series is aligned with the rows
    ts = pd.to_datetime(request_ts, utc=True)
    if isinstance(ts, pd.Timestamp):
        epoch_s = np.full(n, ts.value / 1e9)
        local = ts + pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)
        hour = np.full(n, float(local.hour))
        dow = np.full(n, float(local.dayofweek))
    else:
        ts = pd.Series(ts.values)
        # unit-free (parquet round trips turn ns into us): seconds since the epoch as float64
        epoch_s = ((ts - pd.Timestamp(0)) / pd.Timedelta(seconds=1)).to_numpy(dtype="float64")  # ts: naive UTC
        local = ts + pd.Timedelta(hours=LOCAL_UTC_OFFSET_HOURS)
        hour = local.dt.hour.to_numpy(dtype="float64")
        dow = local.dt.dayofweek.to_numpy(dtype="float64")
    last = _numeric(columns, "tmp_last_impression_ts")
    created = _numeric(columns, "post_created_ts")
    since_last = np.asarray(epoch_s - last, dtype="float64")
    out: dict[str, np.ndarray] = {
        "req_hour_of_day": hour,
        "req_day_of_week": dow,
        "req_secs_since_last_impression": since_last,
        "req_post_age_hours": np.asarray((epoch_s - created) / 3600.0, dtype="float64"),
        **indicators,
    }
    # tmp_impressions_<W> count the window ending at the user's previous impression; a request W or
    # more after it has an empty window (same rule offline and online, so the feature means the same).
    for col, window_s in TEMPORAL_WINDOWS_S.items():
        if col in columns:
            out[col] = np.where(since_last >= window_s, 0.0, _numeric(columns, col))
    return out


def _numeric(columns, name: str) -> np.ndarray | float:
    """Column ``name`` as float64 (non-numbers NaN), or NaN when absent."""
    if name not in columns:
        return np.nan
    return np.asarray(pd.to_numeric(columns[name], errors="coerce"), dtype="float64")
