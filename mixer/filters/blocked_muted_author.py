"""Drops posts of authors the user blocked or muted (social-graph edges written by the stream processor)."""

from __future__ import annotations

from mixer.candidate import Candidate, Query
from mixer.components import Filter, FilterResult


class BlockedMutedAuthorFilter(Filter):
    """Removes candidates whose ``author_id`` is in ``query.blocked_authors`` or
    ``query.muted_authors``: a block or mute takes effect on the next request, since the stream
    processor writes the edge to Redis as it arrives and the query hydrator reads it per request."""

    name = "blocked_muted_author"

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """Kept / removed candidates, each in input order."""
        hidden = query.blocked_authors | query.muted_authors
        return FilterResult.drop_members(candidates, "author_id", hidden)
