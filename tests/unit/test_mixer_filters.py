"""Pre-scoring filters, each on its own."""

from __future__ import annotations

import math

import pytest

from mixer.candidate import Candidate, Query
from mixer.filters import BlockedMutedAuthorFilter, DuplicateFilter, HatedAuthorFilter, MaxAgeFilter, PreviouslySeenFilter

NOW = 1_000_000.0
DAY = 86400.0


def _q(**kw):
    return Query(user_id=1, page_size=10, now_s=NOW, request_id="r", **kw)


def _c(pid, author=10, age_days=1.0, source="popular"):
    return Candidate(post_id=pid, source=source, author_id=author, created_ts=NOW - age_days * DAY)


def _ids(candidates):
    return [c.post_id for c in candidates]


def test_previously_seen_drops_log_served_and_cursor_posts():
    cands = [_c(i) for i in range(6)]
    q = _q(seen_posts=frozenset({0}), served_posts=frozenset({2}), excluded_posts=frozenset({4}))
    out = PreviouslySeenFilter().apply(q, cands)
    assert _ids(out.kept) == [1, 3, 5] and _ids(out.removed) == [0, 2, 4]
    nothing = PreviouslySeenFilter().apply(_q(), cands)
    assert nothing.kept == cands and nothing.removed == []


def test_hated_author_filter():
    cands = [_c(1, author=7), _c(2, author=8), _c(3, author=7)]
    out = HatedAuthorFilter().apply(_q(hated_authors=frozenset({7})), cands)
    assert _ids(out.kept) == [2] and _ids(out.removed) == [1, 3]


def test_blocked_and_muted_authors_are_dropped():
    cands = [_c(1, author=7), _c(2, author=8), _c(3, author=9), _c(4, author=7)]
    q = _q(blocked_authors=frozenset({7}), muted_authors=frozenset({9}), hated_authors=frozenset({8}))
    out = BlockedMutedAuthorFilter().apply(q, cands)
    assert _ids(out.kept) == [2] and _ids(out.removed) == [1, 3, 4]
    assert BlockedMutedAuthorFilter().apply(_q(), cands).kept == cands


def test_max_age_keeps_window_and_drops_future_and_unknown():
    cands = [_c(1, age_days=29.9), _c(2, age_days=30.1), _c(3, age_days=-0.5), _c(4)]
    cands[3].created_ts = math.nan
    out = MaxAgeFilter(30).apply(_q(), cands)
    assert _ids(out.kept) == [1] and _ids(out.removed) == [2, 3, 4]
    with pytest.raises(ValueError, match="max_age_days"):
        MaxAgeFilter(0)


def test_duplicate_keeps_first_source():
    cands = [_c(1, source="in_network"), _c(2), _c(1, source="popular"), _c(2, source="tag_interest")]
    out = DuplicateFilter().apply(_q(), cands)
    assert [(c.post_id, c.source) for c in out.kept] == [(1, "in_network"), (2, "popular")]
    assert [(c.post_id, c.source) for c in out.removed] == [(1, "popular"), (2, "tag_interest")]


def test_filters_are_always_enabled():
    filters = [PreviouslySeenFilter(), HatedAuthorFilter(), BlockedMutedAuthorFilter(), MaxAgeFilter(30),
               DuplicateFilter()]
    assert all(f.enabled(_q()) for f in filters)
