"""Cuts the ranked list to one page and makes the cursor for the next one."""

from __future__ import annotations

from mixer.candidate import Candidate
from mixer.selectors.page_cursor import PageCursor


class PageSelector:
    """The first ``page_size`` ranked candidates not served on earlier pages.

    ``next_cursor`` is None when the page came out short (the ranked list is exhausted), else the
    cursor carrying every post served so far.
    """

    name = "page"

    def select(self, candidates: list[Candidate], page_size: int,
               cursor: PageCursor) -> tuple[list[Candidate], PageCursor | None]:
        """Return ``(page, next cursor or None)``.

        Raises:
            ValueError: ``page_size < 1``.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        earlier = set(cursor.served)
        page = [c for c in candidates if c.post_id not in earlier][:page_size]
        nxt = cursor.next([c.post_id for c in page]) if len(page) == page_size else None
        return page, nxt
