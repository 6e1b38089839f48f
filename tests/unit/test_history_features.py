"""core.history_features (the shared formula) and pipelines.history_features (training rows, point
in time: the sequence before each request, the neighbours of the index build serving it)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.history_features import HISTORY_FEATURES, coengagement_scores, history_feature_columns
from core.schema import IMPRESSIONS_COLUMNS, POSTS_COLUMNS, SOCIAL_EDGES_COLUMNS


def arr(*x):
    return np.asarray(x)


def test_coengagement_scores_sum_max_and_count_per_neighbour():
    ids, total, best, count = coengagement_scores([(arr(5, 6), arr(0.5, 0.2)), (arr(6, 7), arr(0.4, 0.1)),
                                                   (arr(), arr())])
    assert ids.tolist() == [5, 6, 7]
    assert total.tolist() == pytest.approx([0.5, 0.6, 0.1])
    assert best.tolist() == pytest.approx([0.5, 0.4, 0.1]) and count.tolist() == [1, 2, 1]
    empty = coengagement_scores([])
    assert all(len(a) == 0 for a in empty)


def test_history_columns_by_hand():
    cols = history_feature_columns(
        seq_authors=[100, 100, 101, -1], seq_tags=[7, 8, 7, -1],
        seed_lists=[(arr(5, 6), arr(0.5, 0.2)), (arr(6,), arr(0.4))],
        cand_posts=[6, 5, 9], cand_authors=[100, 102, -1], cand_tags=[7, -1, 8])
    assert set(cols) == set(HISTORY_FEATURES)
    assert cols["hist_coeng_sum"].tolist() == pytest.approx([0.6, 0.5, 0.0])
    assert cols["hist_coeng_max"].tolist() == pytest.approx([0.4, 0.5, 0.0])
    assert cols["hist_coeng_seeds"].tolist() == [2, 1, 0]
    assert cols["hist_author_engagements"].tolist() == [2, 0, 0]  # -1 (unknown) never matches
    assert cols["hist_tag_engagements"].tolist() == [2, 0, 1]
    assert cols["hist_len"].tolist() == [4, 4, 4]
    cold = history_feature_columns([], [], [], [1, 2], [3, 4], [5, 6])
    assert all(np.array_equal(v, np.zeros(2)) for v in cold.values())  # zeros, not NaN: "no history"
    with pytest.raises(ValueError, match="authors"):
        history_feature_columns([], [], [], [1, 2], [3], [5, 6])


T0 = pd.Timestamp("2022-04-26T10:00:00Z")


def imp(user, post, minutes, **labels) -> dict:
    row = {c: 0 for c in IMPRESSIONS_COLUMNS}
    return row | {"user_id": user, "post_id": post, "author_id": 1000 + post,
                  "event_ts": T0 + pd.Timedelta(minutes=minutes)} | labels


def test_training_rows_see_the_sequence_before_their_request_and_the_days_neighbours():
    from pipelines.candidate_index import CanonicalTables
    from pipelines.history_features import add_history_features

    impressions = pd.DataFrame([imp(1, 1, 0, long_view=1), imp(1, 2, 10, like=1), imp(1, 3, 20, click=1),
                                imp(1, 2, 60 * 20, long_view=1)])  # 2 again on the next day
    posts = pd.DataFrame([{"post_id": p, "author_id": 1000 + p, "created_ts": T0 - pd.Timedelta(days=2),
                           "duration_ms": 1, "video_type": "NORMAL", "tags": str(p % 2), "primary_tag": p % 2}
                          for p in (1, 2, 3, 4)], columns=list(POSTS_COLUMNS))
    tables = CanonicalTables(impressions=impressions, posts=posts,
                             social_edges=pd.DataFrame(columns=list(SOCIAL_EDGES_COLUMNS)))
    asked = []

    def neighbours_for(cutoff):  # a day's table: the later day knows 2 -> 4 better
        asked.append(cutoff)
        score = 0.3 if cutoff < pd.Timestamp("2022-04-27T00:00:00Z") else 0.9
        return pd.DataFrame({"post_id": [2, 1], "neighbour_id": [4, 4], "score": [score, 0.1]})

    rows = pd.DataFrame({
        "user_id": [1, 1, 1, 2],
        "post_id": [4, 4, 4, 4], "author_id": [1004, 1002, 1004, 1004], "tag_id": [0, 0, 0, 0],
        # before anything; after 1 and 2 (the click of 3 is no engagement); the next day; a cold user
        "request_ts": [T0 - pd.Timedelta(minutes=1), T0 + pd.Timedelta(minutes=30),
                       T0 + pd.Timedelta(hours=21), T0 + pd.Timedelta(minutes=30)],
    })
    out = add_history_features(None, rows, tables, neighbours_for=neighbours_for, log=None)
    assert out[list(HISTORY_FEATURES)].iloc[0].tolist() == [0.0] * 6
    assert out.loc[1, "hist_len"] == 2 and out.loc[1, "hist_coeng_sum"] == pytest.approx(0.3 + 0.1)
    assert out.loc[1, "hist_coeng_seeds"] == 2 and out.loc[1, "hist_author_engagements"] == 1
    assert out.loc[1, "hist_tag_engagements"] == 1  # post 2 has primary tag 0, like the candidate
    # the next day: 2's newer engagement replaces its older one (still 2 posts); the new table
    assert out.loc[2, "hist_len"] == 2 and out.loc[2, "hist_coeng_sum"] == pytest.approx(0.9 + 0.1)
    assert out.loc[3, "hist_len"] == 0 and out.loc[3, "hist_coeng_sum"] == 0
    assert asked == [pd.Timestamp("2022-04-26T00:00:00Z"), pd.Timestamp("2022-04-27T00:00:00Z")]
    assert list(out["post_id"]) == list(rows["post_id"])  # same rows, same order
    with pytest.raises(ValueError, match="request_ts"):
        add_history_features(None, rows.drop(columns="request_ts"), tables, neighbours_for=neighbours_for)
