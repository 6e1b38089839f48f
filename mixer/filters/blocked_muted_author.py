"""Drops posts of authors the user blocked or muted (social-graph edges written by the stream processor)."""

from __future__ import annotations

from mixer.candidate import Candidate, Query


class BlockedMutedAuthorFilter:
    """Removes candidates whose ``author_id`` is in ``query.blocked_authors`` or
    ``query.muted_authors``: a block or mute takes effect on the next request, since the stream
    processor writes the edge to Redis as it arrives and the query hydrator reads it per request."""

    name = "blocked_muted_author"

    def apply(self, query: Query, candidates: list[Candidate]) -> list[Candidate]:
        hidden = query.blocked_authors | query.muted_authors
        if not hidden:
            return candidates
        return [c for c in candidates if c.author_id not in hidden]
