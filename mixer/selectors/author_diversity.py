"""Author diversity: a decaying discount per author (Twitter home-mixer) plus a hard cap per page."""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from mixer.candidate import Candidate, Query
from mixer.components import Selector, SelectorResult

if TYPE_CHECKING:
    import pandas as pd


def author_discount(position: int, decay: float = 0.5, floor: float = 0.25) -> float:
    """Discount of an author's ``position``-th best candidate (0-based):
    ``(1 - floor) * decay**position + floor`` (Twitter the-algorithm, home-mixer
    ``AuthorDiversityDiscountProvider``: Decay = 0.5, Floor = 0.25), so 1, 0.625, 0.4375, ... -> 0.25."""
    return (1.0 - floor) * decay**position + floor


class AuthorDiversitySelector(Selector):
    """Re-ranks with the author discount, then keeps at most ``max_per_author`` per author.

    Each author's candidates are ordered by blended score; the n-th gets its score multiplied by
    ``author_discount(n)`` (divided for a negative score, so the discount always lowers it); all
    candidates are re-sorted by the discounted score, which becomes ``Candidate.score``. Then any
    candidate past the author's ``max_per_author``-th is dropped: a page never shows more than that
    many posts of one author (the next page is a new request, where they may come back).

    Raises:
        ValueError: ``max_per_author < 1``.
    """

    name = "author_diversity"

    def __init__(self, max_per_author: int, decay: float = 0.5, floor: float = 0.25):
        if max_per_author < 1:
            raise ValueError(f"max_per_author must be >= 1, got {max_per_author}")
        self.max_per_author = max_per_author
        self.decay = decay
        self.floor = floor

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> SelectorResult:
        """The diversified candidates, best first (``score`` updated in place). The result carries
        no feature frame (it runs after scoring; re-ordering the frame would be a wasted copy)."""
        by_author: dict[int, list[Candidate]] = defaultdict(list)
        for c in sorted(candidates, key=lambda c: -c.score):
            by_author[c.author_id].append(c)
        kept = []
        for group in by_author.values():
            for pos, c in enumerate(group[: self.max_per_author]):
                d = author_discount(pos, self.decay, self.floor)
                c.score = c.score * d if c.score >= 0 else c.score / d
                kept.append(c)
        kept.sort(key=lambda c: -c.score)
        return SelectorResult(kept)
