"""pipelines.canonical: dedup, author join, timestamps, tags and social edge weights."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.schema import (
    ENGAGEMENT_EDGE_WEIGHTS,
    IMPRESSIONS_COLUMNS,
    POSTS_COLUMNS,
    SOCIAL_EDGES_COLUMNS,
    USERS_COLUMNS,
)
from core.state import StateDir
from pipelines.canonical import (
    build_canonical,
    deduplicate_log,
    engagement_weight,
    impressions_table,
    posts_table,
    social_edges_table,
)
from pipelines.raw import LOG_DTYPES, RawData, load_raw

T0 = 1_650_900_000_000  # 2022-04-25T15:20:00Z in epoch ms


def log_rows(*rows: dict) -> pd.DataFrame:
    """Raw log rows with zero defaults for every column not given."""
    frame = pd.DataFrame([{c: 0 for c in LOG_DTYPES} | {"date": 20220425} | r for r in rows])
    return frame.astype(LOG_DTYPES)


def videos_rows(*rows: dict) -> pd.DataFrame:
    base = {"video_type": "NORMAL", "upload_dt": "2022-04-10", "video_duration": 10_000.0, "tag": "7"}
    return pd.DataFrame([base | r for r in rows])


def test_deduplicate_drops_repeats_of_user_video_ms_only():
    log = log_rows(
        {"user_id": 1, "video_id": 10, "time_ms": T0, "is_click": 1},
        {"user_id": 1, "video_id": 10, "time_ms": T0, "is_click": 1},       # repeat
        {"user_id": 1, "video_id": 10, "time_ms": T0, "is_click": 1},       # repeat
        {"user_id": 1, "video_id": 10, "time_ms": T0 + 1},                  # other ms
        {"user_id": 2, "video_id": 10, "time_ms": T0},                      # other user
        {"user_id": 1, "video_id": 11, "time_ms": T0},                      # other video
    )
    out, dropped = deduplicate_log(log)
    assert dropped == 2 and len(out) == 4
    assert not out.duplicated(["user_id", "video_id", "time_ms"]).any()


def test_dedup_count_on_real_log_matches_group_sizes(data_dir):
    log = load_raw(data_dir).log
    sizes = log.groupby(["user_id", "video_id", "time_ms"]).size()
    _, dropped = deduplicate_log(log)
    assert dropped == int((sizes - 1).sum()) > 0
    assert 0.01 < dropped / len(log) < 0.05  # the data README says about 2.5%


def test_impressions_join_author_and_drop_unknown_videos():
    log = log_rows({"user_id": 1, "video_id": 10, "time_ms": T0 + 5, "is_click": 1, "long_view": 1},
                   {"user_id": 2, "video_id": 99, "time_ms": T0},  # unknown video
                   {"user_id": 3, "video_id": 11, "time_ms": T0})
    videos = videos_rows({"video_id": 10, "author_id": 500}, {"video_id": 11, "author_id": 501})
    imp, unknown = impressions_table(log, videos)
    assert list(imp.columns) == list(IMPRESSIONS_COLUMNS)
    assert unknown.tolist() == [99]
    assert imp["post_id"].tolist() == [11, 10]  # sorted by event_ts
    assert imp.set_index("post_id").loc[10, "author_id"] == 500
    assert str(imp["event_ts"].dtype) == "datetime64[us, UTC]"
    assert imp.set_index("post_id").loc[10, "event_ts"] == pd.Timestamp(T0 + 5, unit="ms", tz="UTC")
    assert imp.set_index("post_id").loc[10, ["click", "long_view", "like"]].tolist() == [1, 1, 0]


def test_posts_created_at_beijing_midnight_and_tags():
    videos = videos_rows(
        {"video_id": 1, "author_id": 5, "upload_dt": "2022-04-10", "tag": "20,43"},
        {"video_id": 2, "author_id": 5, "upload_dt": None, "tag": None, "video_type": "AD"},
    )
    posts = posts_table(videos).set_index("post_id")
    assert list(posts.reset_index().columns) == list(POSTS_COLUMNS)
    assert posts.loc[1, "created_ts"] == pd.Timestamp("2022-04-09T16:00:00Z")
    assert pd.isna(posts.loc[2, "created_ts"])
    assert (posts.loc[1, "tags"], posts.loc[1, "primary_tag"]) == ("20,43", 20)
    assert (posts.loc[2, "tags"], posts.loc[2, "primary_tag"]) == ("", -1)


def test_edge_weights_sum_positive_heads_and_follow_edges():
    heads = {"is_click": 1, "long_view": 1, "is_like": 1, "is_follow": 1, "is_comment": 1,
             "is_forward": 1, "is_hate": 1}
    log = log_rows({"user_id": 1, "video_id": 10, "time_ms": T0} | heads,            # everything
                   {"user_id": 1, "video_id": 11, "time_ms": T0 + 1, "is_like": 1},  # like only
                   {"user_id": 2, "video_id": 10, "time_ms": T0 + 2, "is_hate": 1},  # negative only
                   {"user_id": 3, "video_id": 10, "time_ms": T0 + 3})                # nothing
    videos = videos_rows({"video_id": 10, "author_id": 500}, {"video_id": 11, "author_id": 501})
    imp, _ = impressions_table(log, videos)
    assert engagement_weight(imp).tolist() == [sum(ENGAGEMENT_EDGE_WEIGHTS.values()),
                                               ENGAGEMENT_EDGE_WEIGHTS["like"], 0.0, 0.0]
    edges = social_edges_table(imp)
    assert list(edges.columns) == list(SOCIAL_EDGES_COLUMNS)
    follow = edges[edges["edge_type"] == "follow"]
    assert follow[["user_id", "author_id", "weight"]].values.tolist() == [[1, 500, 1.0]]
    engagement = edges[edges["edge_type"] == "engagement"].set_index("author_id")
    assert sorted(engagement.index) == [500, 501] and set(engagement["user_id"]) == {1}
    assert engagement.loc[501, "event_ts"] == pd.Timestamp(T0 + 1, unit="ms", tz="UTC")


def test_build_canonical_writes_typed_parquet(tmp_path, data_dir):
    full = load_raw(data_dir)
    log = pd.concat([full.log.head(300), full.log.head(20)], ignore_index=True)  # 20 repeats
    raw = RawData(log=log, users=full.users, videos=full.videos, log_path=full.log_path,
                  users_path=full.users_path, videos_path=full.videos_path)
    state = StateDir(tmp_path).ensure()
    stats = build_canonical(raw, state)
    _, expected_dropped = deduplicate_log(log)
    assert stats.duplicates_dropped == expected_dropped >= 20
    assert stats.impressions == len(log) - stats.duplicates_dropped - stats.unknown_video_rows
    expected_cols = {"impressions": IMPRESSIONS_COLUMNS, "posts": POSTS_COLUMNS,
                     "users": USERS_COLUMNS, "social_edges": SOCIAL_EDGES_COLUMNS}
    timestamps = []
    for name, cols in expected_cols.items():
        schema = pq.read_schema(state.table(name))
        assert schema.names == list(cols)
        timestamps += [(name, f.name, str(f.type)) for f in schema if pa.types.is_timestamp(f.type)]
    assert sorted(t[:2] for t in timestamps) == [("impressions", "event_ts"), ("posts", "created_ts"),
                                                 ("social_edges", "event_ts")]
    assert {t[2] for t in timestamps} == {"timestamp[us, tz=UTC]"}
    edges = pd.read_parquet(state.table("social_edges"))
    assert (edges["edge_type"] == "follow").sum() == stats.follow_edges
    assert (edges["edge_type"] == "engagement").sum() == stats.engagement_edges


@pytest.mark.parametrize("bad", ["user_active_degree", "onehot_feat3"])
def test_users_table_requires_schema_columns(data_dir, tmp_path, bad):
    full = load_raw(data_dir)
    raw = RawData(log=full.log.head(5), users=full.users.drop(columns=[bad]), videos=full.videos,
                  log_path=full.log_path, users_path=full.users_path, videos_path=full.videos_path)
    with pytest.raises(ValueError, match=bad):
        build_canonical(raw, StateDir(tmp_path).ensure())
