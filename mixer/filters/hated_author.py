"""Drops posts of authors the user gave negative feedback ("hate") on."""

from __future__ import annotations

from mixer.candidate import Candidate, Query


class HatedAuthorFilter:
    """Removes candidates whose ``author_id`` is in ``query.hated_authors`` (Twitter's
    "see fewer from this author" / mute works the same way: the author disappears from the feed)."""

    name = "hated_author"

    def apply(self, query: Query, candidates: list[Candidate]) -> list[Candidate]:
        if not query.hated_authors:
            return candidates
        return [c for c in candidates if c.author_id not in query.hated_authors]
