"""Drops posts the user already saw (impression log), was served recently, or got on an earlier page."""

from __future__ import annotations

from mixer.candidate import Candidate, Query


class PreviouslySeenFilter:
    """Removes candidates in ``query.seen_posts`` (log, before the index cutoff),
    ``query.served_posts`` (served by the mixer within the served TTL) or ``query.excluded_posts``
    (earlier pages of this timeline, from the cursor)."""

    name = "previously_seen"

    def apply(self, query: Query, candidates: list[Candidate]) -> list[Candidate]:
        drop = query.seen_posts | query.served_posts | query.excluded_posts
        if not drop:
            return candidates
        return [c for c in candidates if c.post_id not in drop]
