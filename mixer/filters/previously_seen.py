"""Drops posts the user already saw (impression log), was served recently, or got on an earlier page."""

from __future__ import annotations

from mixer.candidate import Candidate, Query
from mixer.components import Filter, FilterResult


class PreviouslySeenFilter(Filter):
    """Removes candidates in ``query.seen_posts`` (log, before the index cutoff),
    ``query.served_posts`` (served by the mixer within the served TTL) or ``query.excluded_posts``
    (earlier pages of this timeline, from the cursor)."""

    name = "previously_seen"

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """Kept / removed candidates, each in input order."""
        drop_ids = query.seen_posts | query.served_posts | query.excluded_posts
        return FilterResult.drop_members(candidates, "post_id", drop_ids)
