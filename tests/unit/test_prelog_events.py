"""pipelines.canonical.prelog_events_table and pipelines.raw.read_sequences (pandas only)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.schema import PRELOG_EVENTS_COLUMNS, PRELOG_KINDS
from pipelines.canonical import prelog_events_table
from pipelines.raw import SEQUENCE_COLUMNS, SEQUENCES_FILE, RawDataParseError, read_sequences

LAST_MS = 1_650_700_000_000  # 2022-04-23T07:46:40Z
EXPECTED_DTYPES = {"user_id": "int64", "post_id": "int64", "author_id": "int64", "tag_id": "int64",
                   "event_ts": "datetime64[us, UTC]", "kind": "string",
                   "position": "int64"}


def posts(*rows: tuple[int, int, int]) -> pd.DataFrame:
    """Canonical-like posts: (post_id, author_id, primary_tag)."""
    return pd.DataFrame(rows, columns=["post_id", "author_id", "primary_tag"]).astype("int64")


def sequences(*rows: dict) -> pd.DataFrame:
    base = {"history_len": 0, "watch_seq": [], "long_watch_seq": [], "like_seq": []}
    frame = pd.DataFrame([base | r for r in rows], columns=[*base, "user_id", "last_time_ms"])
    return frame[list(SEQUENCE_COLUMNS)]


POSTS = posts((10, 500, 7), (11, 500, 8), (12, 501, -1), (13, 502, 7))


def assert_typed(frame: pd.DataFrame):
    assert list(frame.columns) == list(PRELOG_EVENTS_COLUMNS)
    assert {c: str(t) for c, t in frame.dtypes.items()} == EXPECTED_DTYPES


def test_counts_per_kind_equal_sequence_lengths_minus_unknown_videos():
    seq = sequences(
        # numpy arrays, as pd.read_parquet gives them; 99 is not a post; 10 watched twice
        {"user_id": 1, "last_time_ms": LAST_MS, "watch_seq": np.array([10, 11, 99, 10, 12]),
         "long_watch_seq": np.array([10, 13]), "like_seq": np.array([11])},
        # empty lists: no rows of that kind
        {"user_id": 2, "last_time_ms": LAST_MS + 5, "watch_seq": [13], "long_watch_seq": [],
         "like_seq": []},
        # only unknown videos: no rows at all
        {"user_id": 3, "last_time_ms": LAST_MS, "watch_seq": [98, 99], "long_watch_seq": [98],
         "like_seq": [99]},
    )
    out = prelog_events_table(seq, POSTS)
    assert_typed(out)
    counts = out.groupby(["user_id", "kind"]).size().to_dict()
    assert counts == {(1, "watch"): 4, (1, "long_view"): 2, (1, "like"): 1, (2, "watch"): 1}
    assert set(out["kind"]) <= set(PRELOG_KINDS)
    assert 3 not in set(out["user_id"]) and 99 not in set(out["post_id"])
    assert sorted(out.loc[(out.user_id == 1) & (out.kind == "watch"), "post_id"]) == [10, 10, 11, 12]
    # the sequence order survives as position (0 = oldest; the unknown video keeps its slot)
    watch = out[(out.user_id == 1) & (out.kind == "watch")]
    assert watch["post_id"].tolist() == [10, 11, 10, 12] and watch["position"].tolist() == [0, 1, 3, 4]
    assert out.loc[(out.user_id == 1) & (out.kind == "long_view"), "position"].tolist() == [0, 1]


def test_event_ts_is_last_time_plus_one_ms_and_posts_metadata_is_joined():
    seq = sequences({"user_id": 1, "last_time_ms": LAST_MS, "watch_seq": [10, 12, 13]},
                    {"user_id": 2, "last_time_ms": LAST_MS + 5, "like_seq": [11]})
    out = prelog_events_table(seq, POSTS)
    stamps = out.groupby("user_id")["event_ts"].unique()
    assert list(stamps[1]) == [pd.Timestamp(LAST_MS + 1, unit="ms", tz="UTC")]
    assert list(stamps[2]) == [pd.Timestamp(LAST_MS + 6, unit="ms", tz="UTC")]
    meta = out.set_index(["user_id", "post_id"])[["author_id", "tag_id"]]
    assert meta.loc[(1, 10)].tolist() == [500, 7]
    assert meta.loc[(1, 12)].tolist() == [501, -1]  # untagged posts keep tag -1 (the jobs filter)
    assert meta.loc[(1, 13)].tolist() == [502, 7]
    assert meta.loc[(2, 11)].tolist() == [500, 8]


@pytest.mark.parametrize("seq", [None, sequences().iloc[:0]], ids=["none", "empty-frame"])
def test_no_sequences_give_an_empty_typed_table(seq):
    out = prelog_events_table(seq, POSTS)
    assert len(out) == 0
    assert_typed(out)


def test_sequences_of_only_unknown_videos_give_an_empty_typed_table():
    out = prelog_events_table(sequences({"user_id": 1, "last_time_ms": LAST_MS, "watch_seq": [99]}), POSTS)
    assert len(out) == 0
    assert_typed(out)


def test_read_sequences_missing_file_and_missing_column(tmp_path):
    assert read_sequences(tmp_path / SEQUENCES_FILE) is None
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"user_id": [1], "last_time_ms": [LAST_MS]}).to_parquet(bad)
    with pytest.raises(RawDataParseError, match="watch_seq"):
        read_sequences(bad)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(RawDataParseError, match="parquet"):
        read_sequences(junk)


def test_real_sequences_become_events(data_dir):
    """On the real file: per user and kind, rows = sequence entries whose video is a known post."""
    from pipelines.canonical import posts_table
    from pipelines.raw import load_raw

    raw = load_raw(data_dir)
    seq = raw.sequences
    assert seq is not None and list(seq.columns) == list(SEQUENCE_COLUMNS)
    post_frame = posts_table(raw.videos)
    known = set(post_frame["post_id"])
    out = prelog_events_table(seq, post_frame)
    assert_typed(out)
    for kind, column in (("watch", "watch_seq"), ("long_view", "long_watch_seq"), ("like", "like_seq")):
        expected = seq[column].map(lambda s: sum(int(v) in known for v in s))
        expected.index = seq["user_id"]
        got = out[out["kind"] == kind].groupby("user_id").size().reindex(expected.index, fill_value=0)
        assert (got == expected).all(), kind
    first = out.groupby("user_id")["event_ts"].agg(["min", "max"])
    assert (first["min"] == first["max"]).all()
    last = pd.to_datetime(seq.set_index("user_id")["last_time_ms"] + 1, unit="ms", utc=True)
    assert (first["min"] == last.reindex(first.index)).all()
