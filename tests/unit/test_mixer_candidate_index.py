"""Candidate index content computed from small canonical frames (no Redis)."""

from __future__ import annotations

import pandas as pd
import pytest

from core.schema import HEADS
from core import online_layout as keys
from pipelines.candidate_index import CanonicalTables, compute_candidate_index

CUTOFF = pd.Timestamp("2022-05-04T16:00:00Z")


def _ts(hours_before: float) -> pd.Timestamp:
    return CUTOFF - pd.Timedelta(hours=hours_before)


def _impressions(rows):
    """rows: (user, post, author, hours_before_cutoff, {head: 1})."""
    out = []
    for user, post, author, h, labels in rows:
        out.append({"user_id": user, "post_id": post, "author_id": author, "event_ts": _ts(h),
                    "date": 20220504, **{k: labels.get(k, 0) for k in HEADS},
                    "play_time_ms": 1000, "duration_ms": 2000, "tab": 1})
    return pd.DataFrame(out)


def _tables():
    posts = pd.DataFrame({
        "post_id": [1, 2, 3, 4],
        "author_id": [10, 10, 20, 30],
        "created_ts": [_ts(500), _ts(400), _ts(300), _ts(-5)],  # post 4 is created after the cutoff
        "duration_ms": [1.0] * 4, "video_type": ["NORMAL"] * 4,
        "tags": ["5,6", "6", "", "5"], "primary_tag": [5, 6, -1, 5],
    })
    imp = _impressions([
        (100, 1, 10, 2, {"click": 1, "like": 1}),       # weight 1 + 3 = 4, within 24 h
        (100, 2, 10, 100, {"long_view": 1}),            # weight 1, within 7 d only
        (100, 3, 20, 1, {"hate": 1}),                   # negative: hated author, no weight
        (200, 1, 10, 30, {"comment": 1, "follow": 1}),  # weight 4 + 5 = 9
        (200, 2, 10, -1, {"like": 1}),                  # after the cutoff: ignored
    ])
    edges = pd.DataFrame({
        "user_id": [100, 100, 200, 200, 200],
        "author_id": [10, 10, 10, 10, 20],
        "event_ts": [_ts(2), _ts(100), _ts(30), _ts(30), _ts(-1)],
        "edge_type": ["engagement", "engagement", "engagement", "follow", "follow"],
        "weight": [4.0, 1.0, 9.0, 1.0, 1.0],
    })
    return CanonicalTables(impressions=imp, posts=posts, social_edges=edges)


def test_only_events_and_posts_before_the_cutoff_are_indexed():
    idx = compute_candidate_index(_tables(), CUTOFF)
    assert sorted(idx.posts["post_id"]) == [1, 2, 3]
    assert sorted(idx.seen["post_id"][idx.seen["user_id"] == 200]) == [1]  # the late like is not seen
    assert idx.follows.values.tolist() == [[200, 10]]  # the follow of 20 is after the cutoff


def test_popular_windows_and_weights():
    idx = compute_candidate_index(_tables(), CUTOFF)
    assert idx.popular["24h"].to_dict() == {1: 4.0}
    assert idx.popular["7d"].to_dict() == {1: 13.0, 2: 1.0}
    tag5 = idx.tag_posts[idx.tag_posts["tag"] == 5].set_index("post_id")["score"].to_dict()
    assert tag5 == {1: 13.0}  # post 4 (tag 5) is not created yet


def test_user_graph_families():
    idx = compute_candidate_index(_tables(), CUTOFF)
    eng = idx.engaged_authors.set_index(["user_id", "author_id"])["weight"].to_dict()
    assert eng == {(100, 10): 5.0, (200, 10): 9.0}
    tags = idx.tag_interest.set_index(["user_id", "tag"])["weight"].to_dict()
    assert tags == {(100, 5): 4.0, (100, 6): 5.0, (200, 5): 9.0, (200, 6): 9.0}
    assert idx.hated_authors.values.tolist() == [[100, 20]]
    counts = idx.counts()
    assert counts["posts"] == 3 and counts["users"] == 2 and counts["popular_24h"] == 1


def test_missing_column_is_named():
    t = _tables()
    bad = CanonicalTables(t.impressions.drop(columns=["like"]), t.posts, t.social_edges)
    with pytest.raises(ValueError, match="like"):
        compute_candidate_index(bad, CUTOFF)


def test_post_meta_round_trip_and_bad_value():
    assert keys.decode_post_meta(keys.encode_post_meta(5, 1650000000, [3, 4])) == (5, 1650000000, (3, 4))
    assert keys.decode_post_meta(b"5|7|") == (5, 7, ())
    with pytest.raises(ValueError, match="rebuild"):
        keys.decode_post_meta("5|7")
