"""Cuts the ranked list to one page and makes the cursor for the next one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mixer.candidate import Candidate, Query
from mixer.components import Selector, SelectorResult
from mixer.selectors.page_cursor import FIRST_PAGE

if TYPE_CHECKING:
    import pandas as pd


class PageSelector(Selector):
    """The first ``query.page_size`` ranked candidates not served on earlier pages
    (``query.cursor``; None = the first page).

    ``next_cursor`` is None when the page came out short (the ranked list is exhausted), else the
    cursor carrying every post served so far (``PageCursor.next``).
    """

    name = "page"

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None = None) -> SelectorResult:
        """The page (``candidates``) and ``next_cursor``; no feature frame (runs after scoring).

        Raises:
            ValueError: ``query.page_size < 1``.
        """
        page_size = query.page_size
        cursor = query.cursor or FIRST_PAGE
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        earlier = set(cursor.served)
        page = [c for c in candidates if c.post_id not in earlier][:page_size]
        nxt = cursor.next([c.post_id for c in page]) if len(page) == page_size else None
        return SelectorResult(page, None, nxt)
