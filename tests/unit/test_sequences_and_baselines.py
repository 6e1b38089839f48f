"""pipelines.sequences (user action sequences, point in time), models.retrieval_baselines
(co-engagement baseline) and the served-order emulation of the whole-funnel evaluation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import IMPRESSIONS_COLUMNS, PRELOG_EVENTS_COLUMNS
from pipelines.sequences import engagement_sequences, last_n

T0 = pd.Timestamp("2022-04-26T00:00:00Z")


def imp(user, post, author, minutes, **labels) -> dict:
    row = {c: 0 for c in IMPRESSIONS_COLUMNS}
    return row | {"user_id": user, "post_id": post, "author_id": author,
                  "event_ts": T0 + pd.Timedelta(minutes=minutes)} | labels


def prelog(user, post, author, kind, position) -> dict:
    return {"user_id": user, "post_id": post, "author_id": author, "tag_id": -1,
            "event_ts": pd.Timestamp("2022-04-24T12:00:00Z"), "kind": kind, "position": position}


IMPRESSIONS = pd.DataFrame([
    imp(1, 10, 100, 0, long_view=1),
    imp(1, 11, 101, 5, click=1),                      # a click alone is not an engagement
    imp(1, 12, 102, 10, long_view=1, like=1),         # strongest label: like
    imp(1, 10, 100, 20, comment=1),                   # 10 again, later: its latest engagement wins
    imp(1, 13, 103, 60, follow=1),                    # after the cutoff below
    imp(2, 12, 102, 1, forward=1),
])
PRELOG = pd.DataFrame([
    prelog(1, 20, 200, "long_view", 0), prelog(1, 21, 201, "long_view", 1), prelog(1, 21, 201, "like", 0),
    prelog(1, 22, 202, "watch", 2),                   # a plain watch is not an engagement
    prelog(3, 23, 203, "long_view", 4),
], columns=list(PRELOG_EVENTS_COLUMNS))


def test_sequences_are_point_in_time_ordered_and_keep_the_latest_strongest_action():
    cutoff = T0 + pd.Timedelta(minutes=30)
    seq = engagement_sequences(IMPRESSIONS, PRELOG, cutoff)
    u1 = seq[seq.user_id == 1]
    assert u1["post_id"].tolist() == [20, 21, 12, 10]  # pre-log order first, then the log in time order
    assert u1["action"].tolist() == ["long_view", "like", "like", "comment"]
    assert u1["author_id"].tolist() == [200, 201, 102, 100]
    assert u1["ts"].is_monotonic_increasing
    cutoff_s = cutoff.value / 1e9
    assert (seq["ts"] < cutoff_s).all()  # nothing at or after the cutoff: the follow of 13 is left out
    assert 13 not in set(seq.post_id) and 11 not in set(seq.post_id) and 22 not in set(seq.post_id)
    assert seq[seq.user_id == 2]["action"].tolist() == ["forward"]
    assert seq[seq.user_id == 3]["post_id"].tolist() == [23]
    # moving the cutoff before the log leaves the pre-log history only; before it, nothing
    early = engagement_sequences(IMPRESSIONS, PRELOG, T0)
    assert set(early.post_id) == {20, 21, 23}
    assert engagement_sequences(IMPRESSIONS, PRELOG, pd.Timestamp("2022-04-24T00:00:00Z")).empty


def test_last_n_keeps_each_users_newest_and_bad_input_is_refused():
    seq = engagement_sequences(IMPRESSIONS, PRELOG, T0 + pd.Timedelta(hours=2))
    kept = last_n(seq, 2)
    assert kept[kept.user_id == 1]["post_id"].tolist() == [10, 13]
    assert kept[kept.user_id == 2]["post_id"].tolist() == [12]
    with pytest.raises(ValueError, match=">= 1"):
        last_n(seq, 0)
    with pytest.raises(ValueError, match="position"):
        engagement_sequences(IMPRESSIONS, PRELOG.drop(columns="position"), T0 + pd.Timedelta(hours=2))
    with pytest.raises(ValueError, match="long_view"):
        engagement_sequences(IMPRESSIONS.drop(columns="long_view"), None, T0)


def seqs(*users: list[int]) -> pd.DataFrame:
    rows = [{"user_id": u, "post_id": p, "ts": float(i)} for u, posts in enumerate(users) for i, p in enumerate(posts)]
    return pd.DataFrame(rows)


def test_cooccurrence_similarity_is_the_windowed_cosine():
    from models.retrieval_baselines import cooccurrence_similarity

    sim, ids = cooccurrence_similarity(seqs([1, 2, 3], [1, 2], [3, 4]), window=1)
    at = {int(p): i for i, p in enumerate(ids)}
    s = sim.toarray()
    # 1-2 co-occur for users 0 and 1 (twice); n_1 = n_2 = 2 users
    assert s[at[1], at[2]] == pytest.approx(2 / np.sqrt(2 * 2))
    assert s[at[2], at[3]] == pytest.approx(1 / np.sqrt(2 * 2))
    assert s[at[1], at[3]] == 0.0  # two apart: outside a window of 1
    assert np.allclose(s, s.T) and np.allclose(np.diag(s), 0)
    wider, _ = cooccurrence_similarity(seqs([1, 2, 3], [1, 2], [3, 4]), window=2)
    assert wider.toarray()[at[1], at[3]] == pytest.approx(1 / np.sqrt(2 * 2))


def test_coengagement_baseline_ranks_neighbours_excludes_history_and_fills_with_popularity():
    from models.retrieval_baselines import coengagement_lists

    data = seqs([1, 2], [1, 2], [1, 3], [5])
    lists = coengagement_lists(data, users=[3, 0, 9], fill=[7, 2, 8, 1], k=4, window=1)
    assert lists[3] == [7, 2, 8, 1]  # post 5 has no neighbour: the popularity list
    assert lists[0] == [3, 7, 8]  # 3 is 1's other neighbour; 1 and 2 are the user's own; then fill
    assert lists[9] == [7, 2, 8, 1]  # unknown user: popularity


def test_served_order_pages_like_the_mixer():
    from home_mixer.whole_funnel import served_order
    from mixer.candidate import Candidate
    from mixer.selectors import AuthorDiversitySelector

    # author 1 has the four best blended scores; light scores put post 6 out of the heavy top 4
    cands = [Candidate(post_id=i, source="s", author_id=a, light_score=ls, score=sc)
             for i, a, ls, sc in [(1, 1, 0.9, 0.99), (2, 1, 0.8, 0.98), (3, 1, 0.7, 0.97), (4, 2, 0.6, 0.5),
                                  (5, 3, 0.5, 0.4), (6, 4, 0.1, 0.96)]]
    order = served_order(cands, page_size=2, heavy_k=4, diversity=AuthorDiversitySelector(2), max_items=10)
    assert sorted(order) == [1, 2, 3, 4, 5, 6] and len(order) == 6
    assert order[:2] == [1, 2]  # page 1: author 1's two best (discounted 0.99, 0.98 * 0.625 > 0.5)
    assert order.index(6) > order.index(3)  # 6 reaches the heavy ranker only once better-light posts were shown
    assert [c.score for c in cands] == [0.99, 0.98, 0.97, 0.5, 0.4, 0.96]  # inputs untouched
    assert served_order(cands, 2, 4, AuthorDiversitySelector(2), max_items=3) == order[:3]
