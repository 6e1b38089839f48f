"""Assembling the hydrated feature frame (shared by both feature hydrators)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from core.schema import ALL_FEATURES
from core.request_features import add_request_features


def finish_feature_frame(stored: pd.DataFrame, now_s: float, surface: int) -> pd.DataFrame:
    """Add request-time features (``core.request_features``) and order columns as ALL_FEATURES.

    Args:
        stored: float64 columns of the four feature views, one row per candidate.
        now_s: request time, epoch seconds UTC.
        surface: the request's surface (``Query.surface``, KuaiRand ``tab`` id, >= 0).

    Returns:
        float64 DataFrame, columns ``ALL_FEATURES``, index 0..N-1.
    """
    frame = add_request_features(stored, pd.Timestamp(now_s, unit="s", tz="UTC"), surface=surface)
    out = frame.reindex(columns=list(ALL_FEATURES)).astype("float64")
    out.index = pd.RangeIndex(len(out))
    return out


def empty_feature_frame() -> pd.DataFrame:
    """A zero-row frame with the ALL_FEATURES columns (float64)."""
    return pd.DataFrame(np.empty((0, len(ALL_FEATURES))), columns=list(ALL_FEATURES))


def missing_feature_frame(n: int) -> pd.DataFrame:
    """``n`` all-NaN rows with the ALL_FEATURES columns (float64, index 0..n-1): what the rankers
    get when feature hydration failed (fail-open)."""
    return empty_feature_frame().reindex(range(n))
