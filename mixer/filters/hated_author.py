"""Drops posts of authors the user gave negative feedback ("hate") on."""

from __future__ import annotations

from mixer.candidate import Candidate, Query
from mixer.components import Filter, FilterResult


class HatedAuthorFilter(Filter):
    """Removes candidates whose ``author_id`` is in ``query.hated_authors`` (Twitter's
    "see fewer from this author" / mute works the same way: the author disappears from the feed)."""

    name = "hated_author"

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """Kept / removed candidates, each in input order."""
        hated = query.hated_authors
        return FilterResult.drop_members(candidates, "author_id", hated)
