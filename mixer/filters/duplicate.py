"""Keeps one candidate per post (several sources can return the same post)."""

from __future__ import annotations

from mixer.candidate import Candidate, Query


class DuplicateFilter:
    """Keeps the first occurrence of each ``post_id``; sources run in priority order (in-network
    first), so the kept copy names the highest-priority source."""

    name = "duplicate"

    def apply(self, query: Query, candidates: list[Candidate]) -> list[Candidate]:
        seen: set[int] = set()
        out = []
        for c in candidates:
            if c.post_id not in seen:
                seen.add(c.post_id)
                out.append(c)
        return out
