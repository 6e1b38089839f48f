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

    def apply_relaxed(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """The rule of a degraded request left with nothing: drops only the posts on earlier pages
        of this timeline (``query.excluded_posts``), so a user who was served every post the
        fallbacks still have gets them again rather than an error. Typical case: Redis dies
        between reading the user's served posts and the candidate sources, whose last-known-good
        lists (the popular posts) the user has all been served."""
        return FilterResult.drop_members(candidates, "post_id", query.excluded_posts)
