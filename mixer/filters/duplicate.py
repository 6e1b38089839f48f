"""Keeps one candidate per post (several sources can return the same post)."""

from __future__ import annotations

from mixer.candidate import Candidate, Query
from mixer.components import Filter, FilterResult


class DuplicateFilter(Filter):
    """Keeps the first occurrence of each ``post_id``; sources run in priority order (in-network
    first), so the kept copy names the highest-priority source."""

    name = "duplicate"

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """First occurrences kept, later copies removed, each in input order."""
        seen: set[int] = set()
        kept: list[Candidate] = []
        removed: list[Candidate] = []
        for c in candidates:
            if c.post_id in seen:
                removed.append(c)
            else:
                seen.add(c.post_id)
                kept.append(c)
        return FilterResult(kept, removed)
