"""Raw KuaiRand frames -> the canonical tables of ``core.schema`` (parquet, pandas).

Tables (written to ``StateDir.table(name)``, one parquet file each, timestamps ``timestamp[us, UTC]``):

- ``impressions`` (``IMPRESSIONS_COLUMNS``): the deduplicated log, ``video_id`` renamed ``post_id``,
  ``author_id`` joined from the videos, ``event_ts`` from ``time_ms``, labels renamed to heads.
- ``posts`` (``POSTS_COLUMNS``): one row per video.
- ``users`` (``USERS_COLUMNS``): one row per user.
- ``social_edges`` (``SOCIAL_EDGES_COLUMNS``): follow events plus engagement-weighted user->author
  edges (RealGraph idea, Kamath et al. 2014).
- ``prelog_events`` (``PRELOG_EVENTS_COLUMNS``): the users' history before the log, one row per
  video id of their watch / long-view / like sequences (empty when the data has no sequences).

The data is small (171k log rows), so this is pandas; the feature jobs that follow are Spark.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.schema import (
    ENGAGEMENT_EDGE_WEIGHTS,
    IMPRESSIONS_COLUMNS,
    POSITIVE_HEADS,
    POSTS_COLUMNS,
    PRELOG_EVENTS_COLUMNS,
    RAW_LABEL_COLUMNS,
    SOCIAL_EDGES_COLUMNS,
    USERS_COLUMNS,
)
from core.state import StateDir
from pipelines.raw import RawData

# A row repeated with the same user, video and millisecond is one impression logged twice.
DEDUP_KEY: tuple[str, ...] = ("user_id", "video_id", "time_ms")
# upload_dt is a calendar date in China (UTC+8); a post is taken as created at local midnight.
UPLOAD_TIMEZONE = "Asia/Shanghai"
TS_DTYPE = "datetime64[us, UTC]"
_UNKNOWN_EXAMPLES = 5


@dataclass(frozen=True)
class CanonicalStats:
    """What ``build_canonical`` read, dropped and wrote (row counts).

    Attributes:
        log_rows: rows of the raw log.
        duplicates_dropped: rows repeating an earlier (user_id, video_id, time_ms).
        unknown_video_rows: impressions dropped because their video is not in the videos file.
        unknown_video_examples: up to 5 such video ids.
        impressions, posts, users: rows written to each table.
        follow_edges, engagement_edges: social edges written, by ``edge_type``.
        prelog_events: rows of the pre-log history table.
    """

    log_rows: int
    duplicates_dropped: int
    unknown_video_rows: int
    unknown_video_examples: tuple[int, ...]
    impressions: int
    posts: int
    users: int
    follow_edges: int
    engagement_edges: int
    prelog_events: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def deduplicate_log(log: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Drop rows repeating an earlier (user_id, video_id, time_ms); keep the first.

    Returns:
        (deduplicated frame with a fresh RangeIndex, number of rows dropped). On the
        2022-04-25..05-04 KuaiRand-Pure log 4,739 of 171,671 rows (2.8%) are dropped.
    """
    dup = log.duplicated(list(DEDUP_KEY), keep="first")
    return log.loc[~dup].reset_index(drop=True), int(dup.sum())


def epoch_ms_to_ts(ms: pd.Series) -> pd.Series:
    """Epoch milliseconds (int64) -> ``datetime64[us, UTC]``."""
    return pd.to_datetime(ms.astype("int64"), unit="ms", utc=True).astype(TS_DTYPE)


def impressions_table(log: pd.DataFrame, videos: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """The canonical impressions of a deduplicated log.

    Args:
        log: raw log columns (``pipelines.raw.LOG_DTYPES``), already deduplicated.
        videos: raw videos (``video_id``, ``author_id``).

    Returns:
        (impressions with ``IMPRESSIONS_COLUMNS``, sorted by ``event_ts`` then ``user_id``;
        ``post_id``/``author_id``/``date``/heads/``play_time_ms``/``duration_ms``/``tab`` int64,
        ``event_ts`` timestamp[us, UTC]; the video ids of dropped rows whose video is unknown).
    """
    authors = videos[["video_id", "author_id"]].astype("int64")
    merged = log.merge(authors, on="video_id", how="left", validate="many_to_one")
    unknown = merged["author_id"].isna()
    unknown_ids = merged.loc[unknown, "video_id"].reset_index(drop=True)
    merged = merged.loc[~unknown]
    out = pd.DataFrame({
        "user_id": merged["user_id"].astype("int64"),
        "post_id": merged["video_id"].astype("int64"),
        "author_id": merged["author_id"].astype("int64"),
        "event_ts": epoch_ms_to_ts(merged["time_ms"]),
        "date": merged["date"].astype("int64"),
        **{head: merged[raw].astype("int64") for raw, head in RAW_LABEL_COLUMNS.items()},
        "play_time_ms": merged["play_time_ms"].astype("int64"),
        "duration_ms": merged["duration_ms"].astype("int64"),
        "tab": merged["tab"].astype("int64"),
    })[list(IMPRESSIONS_COLUMNS)]
    out = out.sort_values(["event_ts", "user_id"], kind="stable").reset_index(drop=True)
    return out, unknown_ids


def primary_tag(tags: pd.Series) -> pd.Series:
    """First id of a comma-separated tag list as int64; -1 when empty, missing or not a number."""
    first = tags.fillna("").astype(str).str.split(",").str[0].str.strip()
    return pd.to_numeric(first, errors="coerce").fillna(-1).astype("int64")


def posts_table(videos: pd.DataFrame) -> pd.DataFrame:
    """The canonical posts: one row per video.

    ``created_ts`` is ``upload_dt`` (a UTC+8 calendar date) at local midnight, in UTC
    (e.g. 2022-04-10 -> 2022-04-09T16:00Z; missing/unparseable -> NaT); ``duration_ms`` is
    ``video_duration`` (float64 ms, NaN when missing); ``tags`` the comma-separated tag ids
    ("" when none); ``primary_tag`` the first of them (int64, -1 when none).
    """
    day = pd.to_datetime(videos["upload_dt"].astype("string"), format="%Y-%m-%d", errors="coerce")
    created = day.dt.tz_localize(UPLOAD_TIMEZONE).dt.tz_convert("UTC").astype(TS_DTYPE)
    tags = videos["tag"].astype("string").fillna("").str.replace(" ", "", regex=False)
    return pd.DataFrame({
        "post_id": videos["video_id"].astype("int64"),
        "author_id": videos["author_id"].astype("int64"),
        "created_ts": created,
        "duration_ms": videos["video_duration"].astype("float64"),
        "video_type": videos["video_type"].astype("string").fillna("UNKNOWN"),
        "tags": tags,
        "primary_tag": primary_tag(tags),
    })[list(POSTS_COLUMNS)].sort_values("post_id").reset_index(drop=True)


def users_table(users: pd.DataFrame) -> pd.DataFrame:
    """The canonical users: ``USERS_COLUMNS`` of the raw user features, dtypes as loaded."""
    missing = [c for c in USERS_COLUMNS if c not in users.columns]
    if missing:
        raise ValueError(f"user features lack columns {missing}; expected {list(USERS_COLUMNS)}")
    return users[list(USERS_COLUMNS)].sort_values("user_id").reset_index(drop=True)


def engagement_weight(impressions: pd.DataFrame) -> pd.Series:
    """RealGraph-style weight per impression: sum of ``ENGAGEMENT_EDGE_WEIGHTS[h]`` over positive heads.

    float64, 0.0 for an impression without positive engagement (hate is not positive).
    """
    weight = np.zeros(len(impressions), dtype="float64")
    for head in POSITIVE_HEADS:
        weight += ENGAGEMENT_EDGE_WEIGHTS[head] * (impressions[head].to_numpy() > 0)
    return pd.Series(weight, index=impressions.index)


def social_edges_table(impressions: pd.DataFrame) -> pd.DataFrame:
    """Social edges user -> author from canonical impressions.

    - ``follow``: one per impression with ``follow`` = 1, weight 1.0 (the user followed the author).
    - ``engagement``: one per impression with any positive head, weight = ``engagement_weight``.

    Returns ``SOCIAL_EDGES_COLUMNS`` sorted by ``event_ts``; ``weight`` float64, ``edge_type`` string.
    """
    keys = ["user_id", "author_id", "event_ts"]
    follows = impressions.loc[impressions["follow"] > 0, keys].assign(edge_type="follow", weight=1.0)
    weight = engagement_weight(impressions)
    engaged = impressions.loc[weight > 0, keys].assign(edge_type="engagement", weight=weight[weight > 0])
    edges = pd.concat([follows, engaged], ignore_index=True)
    edges["edge_type"] = edges["edge_type"].astype("string")
    edges["weight"] = edges["weight"].astype("float64")
    return edges[list(SOCIAL_EDGES_COLUMNS)].sort_values(["event_ts", "user_id"], kind="stable") \
        .reset_index(drop=True)


def prelog_events_table(sequences: pd.DataFrame | None, posts: pd.DataFrame) -> pd.DataFrame:
    """The pre-log history as events: one row per (user, sequence kind, video id in the sequence).

    ``event_ts`` is the user's ``last_time_ms`` + 1 ms (when the whole history is known: a feature
    row built from it is point-in-time correct from then on); ``position`` is the video's index in
    its sequence (0 = oldest: the file lists oldest first), the only order the history has;
    ``author_id`` and ``tag_id`` (the
    primary tag) come from the posts; videos not in the posts table are dropped. ``sequences``
    None gives an empty table with the same columns and dtypes.
    """
    cols = {"user_id": "int64", "post_id": "int64", "author_id": "int64", "tag_id": "int64",
            "event_ts": TS_DTYPE, "kind": "string", "position": "int64"}
    if sequences is None or sequences.empty:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in cols.items()})[list(PRELOG_EVENTS_COLUMNS)]
    parts = []
    for kind, column in (("watch", "watch_seq"), ("long_view", "long_watch_seq"), ("like", "like_seq")):
        rows = sequences[["user_id", "last_time_ms", column]].explode(column).dropna(subset=[column])
        position = rows.groupby(level=0).cumcount()  # explode keeps each user's row label
        parts.append(pd.DataFrame({
            "user_id": rows["user_id"].astype("int64"),
            "post_id": rows[column].astype("int64"),
            "event_ts": epoch_ms_to_ts(rows["last_time_ms"].astype("int64") + 1),
            "kind": kind,
            "position": position.astype("int64"),
        }))
    events = pd.concat(parts, ignore_index=True)
    meta = posts[["post_id", "author_id", "primary_tag"]].rename(columns={"primary_tag": "tag_id"})
    events = events.merge(meta, on="post_id", how="inner")
    return events.astype(cols)[list(PRELOG_EVENTS_COLUMNS)].sort_values(
        ["user_id", "kind", "position"], kind="stable").reset_index(drop=True)


def write_table(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` as one parquet file at ``path`` (timestamps coerced to microseconds).

    A Spark output folder left at the same path is replaced.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        import shutil

        shutil.rmtree(path)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, coerce_timestamps="us")
    return path


def build_canonical(raw: RawData, state: StateDir) -> CanonicalStats:
    """Build and write the canonical tables into ``state`` (impressions, posts, users, social_edges, prelog_events).

    Duplicated (user_id, video_id, time_ms) rows are dropped first, then impressions whose video is
    not in the videos file (counted in the stats).

    Returns:
        ``CanonicalStats`` with the row counts.
    """
    log, duplicates = deduplicate_log(raw.log)
    impressions, unknown = impressions_table(log, raw.videos)
    posts = posts_table(raw.videos)
    users = users_table(raw.users)
    edges = social_edges_table(impressions)
    prelog = prelog_events_table(raw.sequences, posts)
    for name, frame in (("impressions", impressions), ("posts", posts), ("users", users),
                        ("social_edges", edges), ("prelog_events", prelog)):
        write_table(frame, state.table(name))
    return CanonicalStats(
        log_rows=len(raw.log),
        duplicates_dropped=duplicates,
        unknown_video_rows=len(unknown),
        unknown_video_examples=tuple(int(v) for v in unknown.unique()[:_UNKNOWN_EXAMPLES]),
        impressions=len(impressions),
        posts=len(posts),
        users=len(users),
        follow_edges=int((edges["edge_type"] == "follow").sum()),
        engagement_edges=int((edges["edge_type"] == "engagement").sum()),
        prelog_events=len(prelog),
    )
