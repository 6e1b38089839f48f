"""Selectors: top K by light score, author diversity, page + cursor."""

from __future__ import annotations

import base64
import json
import math
import zlib

import numpy as np
import pandas as pd
import pytest

from mixer.candidate import Candidate, Query
from mixer.selectors import AuthorDiversitySelector, CursorError, PageCursor, PageSelector, TopKSelector, author_discount


def _q(page_size=10, cursor=None):
    return Query(user_id=1, page_size=page_size, now_s=0.0, request_id="r", cursor=cursor)


def _c(pid, author, score=math.nan, light=math.nan):
    return Candidate(post_id=pid, source="popular", author_id=author, score=score, light_score=light)


def test_author_discount_matches_twitter_constants():
    assert [author_discount(i) for i in range(4)] == [1.0, 0.625, 0.4375, 0.34375]
    assert author_discount(50) == pytest.approx(0.25)


def test_author_diversity_discounts_and_caps_per_author():
    cands = [_c(1, 7, 10.0), _c(2, 7, 9.0), _c(3, 7, 8.0), _c(4, 8, 6.0), _c(5, 9, -1.0)]
    res = AuthorDiversitySelector(max_per_author=2).select(_q(), cands, None)
    out = res.candidates
    assert res.features is None and res.next_cursor is None
    assert [c.post_id for c in out] == [1, 4, 2, 5]  # post 3 capped; post 2 discounted to 5.625
    scores = {c.post_id: c.score for c in out}
    assert scores[2] == pytest.approx(9.0 * 0.625)
    assert scores[5] == pytest.approx(-1.0)  # an author's first post is not discounted
    assert [c.score for c in out] == sorted((c.score for c in out), reverse=True)


def test_top_k_keeps_best_light_scores_with_their_feature_rows():
    cands = [_c(i, i, light=s) for i, s in enumerate([0.1, 0.9, math.nan, 0.5, 0.7])]
    feats = pd.DataFrame({"x": np.arange(5.0)})
    res = TopKSelector(3).select(_q(), cands, feats)
    kept, rows = res.candidates, res.features
    assert [c.post_id for c in kept] == [1, 4, 3]
    assert rows["x"].tolist() == [1.0, 4.0, 3.0] and list(rows.index) == [0, 1, 2]
    with pytest.raises(ValueError, match="feature frame"):
        TopKSelector(3).select(_q(), cands, None)


def test_cursor_round_trip_and_page_sequence():
    ranked = [_c(i, i, score=100 - i) for i in range(7)]
    page = PageSelector().select(_q(3), ranked, None)
    first, cur = page.candidates, page.next_cursor
    assert page.features is None and [c.post_id for c in first] == [0, 1, 2]
    assert PageSelector().select(_q(3, PageCursor(0, ())), ranked, None).next_cursor == cur
    token = cur.encode()
    assert isinstance(token, str) and "=" not in token
    back = PageCursor.decode(token)
    assert back == cur and back.page_index == 1 and back.served == (0, 1, 2)
    page = PageSelector().select(_q(3, back), ranked, None)
    second, cur2 = page.candidates, page.next_cursor
    assert [c.post_id for c in second] == [3, 4, 5]
    page = PageSelector().select(_q(3, PageCursor.decode(cur2.encode())), ranked, None)
    third, cur3 = page.candidates, page.next_cursor
    assert [c.post_id for c in third] == [6] and cur3 is None  # exhausted


def _token(payload: dict) -> str:
    return base64.urlsafe_b64encode(zlib.compress(json.dumps(payload).encode())).decode()


@pytest.mark.parametrize("token", [
    "", "not-a-cursor", _token({"v": 2, "p": 1, "s": []}), _token({"v": 1, "p": 0, "s": []}),
    _token({"v": 1, "p": 1, "s": ["x"]}), _token({"v": 1}), _token([1, 2]),
])
def test_bad_cursor_raises_cursor_error(token):
    with pytest.raises(CursorError, match="cursor"):
        PageCursor.decode(token)
