"""Drops posts older than a maximum age (or created after the request time)."""

from __future__ import annotations

import math

from mixer.candidate import Candidate, Query
from mixer.components import Filter, FilterResult


class MaxAgeFilter(Filter):
    """Keeps candidates with ``0 <= query.now_s - created_ts <= max_age_days * 86400`` (seconds).

    A post created after the request time cannot have been seen "as of" it; a post without a known
    creation time (NaN) is dropped because its age cannot be checked.

    Raises:
        ValueError: ``max_age_days <= 0``.
    """

    name = "max_age"

    def __init__(self, max_age_days: float):
        if max_age_days <= 0:
            raise ValueError(f"max_age_days must be > 0, got {max_age_days}")
        self.max_age_s = max_age_days * 86400.0

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """Kept / removed candidates, each in input order."""
        now, max_age_s, isnan = query.now_s, self.max_age_s, math.isnan
        kept: list[Candidate] = []
        removed: list[Candidate] = []
        keep, drop = kept.append, removed.append
        for c in candidates:
            if not isnan(c.created_ts) and 0.0 <= now - c.created_ts <= max_age_s:
                keep(c)
            else:
                drop(c)
        return FilterResult(kept, removed)
