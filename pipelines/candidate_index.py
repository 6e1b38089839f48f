"""Build the mixer's Redis candidate index from the canonical tables, as of a cutoff time.

Only events strictly before the cutoff (``as_of``) are used and only posts created before it are
indexed, so an index built as of an impression's time holds nothing the user could not have known.

Redis layout: the candidate-index and graph-set tables of ``core/online_layout.py`` (the one place
that builds the keys and documents each with its type, content and readers): post metadata, posts
per author, popular posts per window, posts per tag, and per user follows, engaged authors, tag
interests, hated authors, seen posts and the user action sequence (last ``sequence_length`` engaged
posts, ``pipelines.sequences``), the co-engagement neighbours of each post when given
(``pipelines.coengagement``, a Spark job run first), plus ``INDEX_META`` (``as_of``, ``built_at``,
one count per family).

"Weighted engagements" are ``sum_h ENGAGEMENT_EDGE_WEIGHTS[h] * label_h`` over impressions
(``core.schema``; RealGraph idea, Kamath et al. 2014); engaged-author weights are the summed
``weight`` of ``social_edges`` rows with ``edge_type == "engagement"`` (the same weights).

The mixer's records (``served_posts``, ``SERVED_IMPRESSIONS``) are not index keys; a rebuild
leaves them alone. A rebuild deletes every index key first (SCAN + UNLINK) and then writes in pipelined
batches, so it is idempotent; it is not atomic for concurrent readers (a request during the
rebuild may see a partial index), so rebuild before serving or during a quiet period.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterable

import numpy as np
import pandas as pd
import redis

from core.schema import (
    ENGAGEMENT_EDGE_WEIGHTS,
    IMPRESSIONS_COLUMNS,
    POSTS_COLUMNS,
    SOCIAL_EDGES_COLUMNS,
)
from core.online_store import connect
from core.state import StateDir
from core import online_layout as keys
from core.history_features import SEQUENCE_LENGTH
from pipelines.sequences import ENGAGED_HEADS, engagement_sequences, last_n

log = logging.getLogger(__name__)

POPULAR_WINDOWS_HOURS: dict[str, int] = {"24h": 24, "7d": 168}
TAG_POSTS_WINDOW_HOURS = 168
BATCH_COMMANDS = 5000  # commands per pipeline round trip


DEFAULT_SEQUENCE_LENGTH = 64  # engagements kept per user in the online store (issue #19's default N)


@dataclass(frozen=True)
class CanonicalTables:
    """The canonical tables the index needs (pandas, columns of ``core.schema``); ``prelog_events``
    (the users' history before the log) is optional: without it sequences hold log engagements only."""

    impressions: pd.DataFrame
    posts: pd.DataFrame
    social_edges: pd.DataFrame
    prelog_events: pd.DataFrame | None = None

    @classmethod
    def load(cls, state: StateDir) -> "CanonicalTables":
        """Read ``impressions``, ``posts`` and ``social_edges`` from ``state.table(name)``.

        Raises:
            FileNotFoundError: a table is missing (run the canonical pipeline first).
        """
        frames = {}
        for name, cols in (("impressions", IMPRESSIONS_COLUMNS), ("posts", POSTS_COLUMNS),
                           ("social_edges", SOCIAL_EDGES_COLUMNS)):
            path = state.table(name)
            if not path.exists():
                raise FileNotFoundError(
                    f"canonical table {path} is missing; run the canonical pipeline (pipelines/canonical.py) first"
                )
            needed = [c for c in cols if c in _NEEDED[name]]
            frames[name] = pd.read_parquet(path, columns=needed)
        prelog = state.table("prelog_events")
        frames["prelog_events"] = pd.read_parquet(prelog) if prelog.exists() else None
        return cls(**frames)


_NEEDED = {
    "impressions": {"user_id", "post_id", "author_id", "event_ts", *ENGAGEMENT_EDGE_WEIGHTS, "hate", *ENGAGED_HEADS},
    "posts": {"post_id", "author_id", "created_ts", "tags", "primary_tag"},
    "social_edges": {"user_id", "author_id", "event_ts", "edge_type", "weight"},
}


def _require(frame: pd.DataFrame, name: str) -> None:
    missing = sorted(_NEEDED[name] - set(frame.columns))
    if missing:
        raise ValueError(f"table {name} lacks columns {missing} (see core.schema); rebuild it")


def _epoch_seconds(ts: pd.Series) -> np.ndarray:
    """UTC timestamps (tz-aware, or naive meaning UTC; any unit) -> int64 epoch seconds (floor)."""
    values = pd.to_datetime(ts, utc=True)
    if values.isna().any():
        raise ValueError(f"column {ts.name} has {int(values.isna().sum())} null timestamps; fix the table")
    return ((values - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).to_numpy(dtype="int64")


def _as_utc(as_of: datetime | pd.Timestamp | str) -> pd.Timestamp:
    ts = pd.Timestamp(as_of)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _parse_tags(value) -> tuple[int, ...]:
    """Tags as a list/array of ints or a comma-separated string (KuaiRand's ``tag``) -> ints."""
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(int(float(t)) for t in value.split(",") if t.strip())
    if isinstance(value, float):
        return () if np.isnan(value) else (int(value),)
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(t) for t in value if t is not None and not (isinstance(t, float) and np.isnan(t)))


def _engagement_weight(impressions: pd.DataFrame) -> np.ndarray:
    w = np.zeros(len(impressions), dtype="float64")
    for head, weight in ENGAGEMENT_EDGE_WEIGHTS.items():
        w += weight * impressions[head].fillna(0).to_numpy(dtype="float64")
    return w


def _empty_frame(dtypes: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in dtypes.items()})


@dataclass(frozen=True)
class CandidateIndexContent:
    """What the index holds, computed in memory (pandas) before it is written.

    Frames (all ids int64, scores float64, times int64 epoch s):
      posts: post_id, author_id, created_ts, tags (tuple of int)
      popular: {window: Series post_id -> score}
      tag_posts: tag, post_id, score
      follows: user_id, author_id
      engaged_authors: user_id, author_id, weight
      tag_interest: user_id, tag, weight
      hated_authors: user_id, author_id
      seen: user_id, post_id, ts
      sequences: user_id, post_id, author_id, action (str), ts (float s): last N engaged posts per user
      coengagement: post_id, neighbour_id, score (empty when no neighbours were given)
    """

    as_of: pd.Timestamp
    posts: pd.DataFrame
    popular: dict[str, pd.Series]
    tag_posts: pd.DataFrame
    follows: pd.DataFrame
    engaged_authors: pd.DataFrame
    tag_interest: pd.DataFrame
    hated_authors: pd.DataFrame
    seen: pd.DataFrame
    sequences: pd.DataFrame = field(default_factory=lambda: _empty_frame(
        {"user_id": "int64", "post_id": "int64", "author_id": "int64", "action": "object", "ts": "float64"}))
    coengagement: pd.DataFrame = field(default_factory=lambda: _empty_frame(
        {"post_id": "int64", "neighbour_id": "int64", "score": "float64"}))

    def counts(self) -> dict[str, int]:
        """Rows per family (keys are stable names used in ``INDEX_META``)."""
        return {
            "posts": len(self.posts),
            "authors": int(self.posts["author_id"].nunique()),
            **{f"popular_{w}": len(s) for w, s in self.popular.items()},
            "tags": int(self.tag_posts["tag"].nunique()) if len(self.tag_posts) else 0,
            "follow_edges": len(self.follows),
            "engaged_author_edges": len(self.engaged_authors),
            "tag_interest_edges": len(self.tag_interest),
            "hated_author_edges": len(self.hated_authors),
            "seen_edges": len(self.seen),
            "sequence_users": int(self.sequences["user_id"].nunique()) if len(self.sequences) else 0,
            "sequence_events": len(self.sequences),
            "coengagement_posts": int(self.coengagement["post_id"].nunique()) if len(self.coengagement) else 0,
            "users": int(pd.concat([self.follows["user_id"], self.engaged_authors["user_id"],
                                    self.seen["user_id"]]).nunique()),
        }


def compute_candidate_index(tables: CanonicalTables, as_of: datetime | pd.Timestamp | str,
                            coengagement: pd.DataFrame | None = None,
                            sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> CandidateIndexContent:
    """Compute every index family from the canonical tables using only what is known before ``as_of``.

    Args:
        tables: canonical impressions, posts, social_edges, optional prelog_events (``core.schema`` columns).
        as_of: the cutoff; tz-aware, or naive meaning UTC.
        coengagement: neighbours from ``pipelines.coengagement.coengagement_neighbours`` computed
            as of the same cutoff (None: the index holds no co-engagement lists).
        sequence_length: engaged posts kept per user (the last ones).

    Raises:
        ValueError: a table lacks a needed column, or ``sequence_length < 1``.
    """
    for name in ("impressions", "posts", "social_edges"):
        _require(getattr(tables, name), name)
    cutoff = _as_utc(as_of)
    cutoff_s = int(cutoff.value // 1_000_000_000)

    posts = tables.posts
    undated = pd.to_datetime(posts["created_ts"], utc=True).isna()
    if undated.any():  # no creation time: age cannot be checked, so the post is not servable
        log.warning("%d posts have no created_ts and are left out of the index", int(undated.sum()))
        posts = posts.loc[~undated]
    created = _epoch_seconds(posts["created_ts"])
    posts = pd.DataFrame({
        "post_id": posts["post_id"].to_numpy(dtype="int64"),
        "author_id": posts["author_id"].to_numpy(dtype="int64"),
        "created_ts": created,
        "tags": [_parse_tags(t) for t in posts["tags"]],
    })
    posts = posts[posts["created_ts"] < cutoff_s].drop_duplicates("post_id", keep="last").reset_index(drop=True)
    known_posts = set(posts["post_id"].tolist())

    imp = tables.impressions
    imp_ts = _epoch_seconds(imp["event_ts"])
    mask = imp_ts < cutoff_s
    imp = pd.DataFrame({
        "user_id": imp["user_id"].to_numpy(dtype="int64")[mask],
        "post_id": imp["post_id"].to_numpy(dtype="int64")[mask],
        "author_id": imp["author_id"].to_numpy(dtype="int64")[mask],
        "ts": imp_ts[mask],
        "weight": _engagement_weight(imp)[mask],
        "hate": imp["hate"].fillna(0).to_numpy(dtype="int64")[mask],
    })

    def window_scores(hours: int) -> pd.Series:
        recent = imp[(imp["ts"] >= cutoff_s - hours * 3600) & (imp["weight"] > 0)]
        scores = recent.groupby("post_id")["weight"].sum()
        return scores[scores.index.isin(known_posts)].astype("float64")

    popular = {window: window_scores(hours) for window, hours in POPULAR_WINDOWS_HOURS.items()}
    tag_score = window_scores(TAG_POSTS_WINDOW_HOURS)
    exploded = posts[["post_id", "tags"]].explode("tags").dropna(subset=["tags"])
    tag_posts = pd.DataFrame({
        "tag": exploded["tags"].astype("int64").to_numpy(),
        "post_id": exploded["post_id"].astype("int64").to_numpy(),
    })
    tag_posts["score"] = tag_posts["post_id"].map(tag_score).fillna(0.0).astype("float64").to_numpy()

    edges = tables.social_edges
    edge_ts = _epoch_seconds(edges["event_ts"])
    edges = edges.loc[edge_ts < cutoff_s]
    follows = (edges.loc[edges["edge_type"] == "follow", ["user_id", "author_id"]]
               .astype("int64").drop_duplicates().reset_index(drop=True))
    engaged = (edges.loc[edges["edge_type"] == "engagement"]
               .groupby(["user_id", "author_id"], as_index=False)["weight"].sum())
    engaged = engaged[engaged["weight"] > 0].astype({"user_id": "int64", "author_id": "int64", "weight": "float64"})

    positive = imp[imp["weight"] > 0][["user_id", "post_id", "weight"]]
    post_tags = posts.set_index("post_id")["tags"]
    positive = positive.assign(tag=positive["post_id"].map(post_tags)).explode("tag").dropna(subset=["tag"])
    tag_interest = (positive.astype({"tag": "int64"}).groupby(["user_id", "tag"], as_index=False)["weight"].sum())

    hated = (imp.loc[imp["hate"] > 0, ["user_id", "author_id"]].drop_duplicates().reset_index(drop=True))
    seen = imp.groupby(["user_id", "post_id"], as_index=False)["ts"].max()
    sequences = last_n(engagement_sequences(tables.impressions, tables.prelog_events, cutoff), sequence_length)
    if coengagement is None:
        coengagement = _empty_frame({"post_id": "int64", "neighbour_id": "int64", "score": "float64"})

    return CandidateIndexContent(
        as_of=cutoff, posts=posts, popular=popular, tag_posts=tag_posts, follows=follows,
        engaged_authors=engaged.reset_index(drop=True), tag_interest=tag_interest.reset_index(drop=True),
        hated_authors=hated, seen=seen.reset_index(drop=True), sequences=sequences,
        coengagement=coengagement[coengagement["neighbour_id"].isin(known_posts)].reset_index(drop=True),
    )


class _BatchedPipeline:
    """A redis-py pipeline that executes every ``BATCH_COMMANDS`` commands (bounded memory)."""

    def __init__(self, client: redis.Redis, batch: int = BATCH_COMMANDS):
        self.pipe = client.pipeline(transaction=False)
        self.batch = batch
        self.pending = 0

    def add(self, method: str, *args, **kwargs) -> None:
        getattr(self.pipe, method)(*args, **kwargs)
        self.pending += 1
        if self.pending >= self.batch:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.pipe.execute()
            self.pending = 0


def grouped_arrays(frame: pd.DataFrame, key: str, cols: list[str]) -> Iterable[tuple[int, list[np.ndarray]]]:
    """Yield ``(key value, [column arrays of that group])`` using one sort instead of groupby objects."""
    if frame.empty:
        return
    frame = frame.sort_values(key, kind="stable")
    k = frame[key].to_numpy()
    arrays = [frame[c].to_numpy() for c in cols]
    bounds = np.flatnonzero(np.diff(k)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(k)]))
    for s, e in zip(starts, ends):
        yield int(k[s]), [a[s:e] for a in arrays]


def delete_candidate_index(client: redis.Redis) -> int:
    """Delete every key the index builder owns (not the mixer's served records). Returns keys deleted."""
    deleted = 0
    for pattern in keys.INDEX_KEY_PATTERNS:
        batch = []
        for key in client.scan_iter(match=pattern, count=10_000):
            batch.append(key)
            if len(batch) >= 5000:
                deleted += client.unlink(*batch)
                batch = []
        if batch:
            deleted += client.unlink(*batch)
    deleted += client.unlink(*keys.INDEX_SINGLE_KEYS)
    return deleted


def _live_sequence_members(client: redis.Redis, since_s: float) -> dict[bytes, list[tuple[bytes, float]]]:
    """Members of every ``hm:{u:<user>}:seq`` stamped at or after ``since_s``: what the stream processor
    appended after the cutoff of the index being replaced (key -> [(member, ts)])."""
    keys_found = list(client.scan_iter(match=keys.action_sequence("*"), count=10_000))  # type: ignore[arg-type]
    live: dict[bytes, list[tuple[bytes, float]]] = {}
    for i in range(0, len(keys_found), BATCH_COMMANDS):
        batch = keys_found[i:i + BATCH_COMMANDS]
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.zrangebyscore(key, since_s, "+inf", withscores=True)
        for key, rows in zip(batch, pipe.execute()):
            if rows:
                live[key] = rows
    return live


def write_candidate_index(client: redis.Redis, content: CandidateIndexContent) -> dict[str, int]:
    """Replace the index in Redis with ``content`` (delete first, then pipelined batched writes).

    The user action sequences keep what the stream processor appended at or after the new cutoff
    (those events are applied once, by event id, and would not come again), capped as the
    processor caps them.

    Returns:
        ``content.counts()`` (also stored in ``INDEX_META`` with ``as_of`` and ``built_at``).
    """
    live = _live_sequence_members(client, content.as_of.value / 1e9)
    delete_candidate_index(client)
    p = _BatchedPipeline(client)

    posts = content.posts
    meta = {int(pid): keys.encode_post_meta(a, c, t)
            for pid, a, c, t in zip(posts["post_id"], posts["author_id"], posts["created_ts"], posts["tags"])}
    items = list(meta.items())
    for i in range(0, len(items), 1000):
        p.add("hset", keys.POST_META, mapping=dict(items[i:i + 1000]))

    for author, (pids, created) in grouped_arrays(posts, "author_id", ["post_id", "created_ts"]):
        p.add("zadd", keys.author_posts(author), dict(zip(pids.tolist(), created.tolist())))
    for window, scores in content.popular.items():
        if len(scores):
            p.add("zadd", keys.popular(window), dict(zip(scores.index.tolist(), scores.tolist())))
    for tag, (pids, scores) in grouped_arrays(content.tag_posts, "tag", ["post_id", "score"]):
        p.add("zadd", keys.tag_posts(tag), dict(zip(pids.tolist(), scores.tolist())))
    for user, (authors,) in grouped_arrays(content.follows, "user_id", ["author_id"]):
        p.add("sadd", keys.follows(user), *authors.tolist())
    for user, (authors, w) in grouped_arrays(content.engaged_authors, "user_id", ["author_id", "weight"]):
        p.add("zadd", keys.engaged_authors(user), dict(zip(authors.tolist(), w.tolist())))
    for user, (tags, w) in grouped_arrays(content.tag_interest, "user_id", ["tag", "weight"]):
        p.add("zadd", keys.tag_interest(user), dict(zip(tags.tolist(), w.tolist())))
    for user, (authors,) in grouped_arrays(content.hated_authors, "user_id", ["author_id"]):
        p.add("sadd", keys.hated_authors(user), *authors.tolist())
    for user, (pids, ts) in grouped_arrays(content.seen, "user_id", ["post_id", "ts"]):
        p.add("zadd", keys.seen_posts(user), dict(zip(pids.tolist(), ts.tolist())))
    for user, (pids, authors, actions, ts) in grouped_arrays(content.sequences, "user_id",
                                                       ["post_id", "author_id", "action", "ts"]):
        p.add("zadd", keys.action_sequence(user),
              {keys.encode_action(pid, a, act): t for pid, a, act, t in zip(pids, authors, actions, ts.tolist())})
    for key, rows in live.items():
        p.add("zadd", key, {m: ts for m, ts in rows}, gt=True)
        p.add("zremrangebyrank", key, 0, -(2 * SEQUENCE_LENGTH + 1))
    for post, (nbrs, scores) in grouped_arrays(content.coengagement, "post_id", ["neighbour_id", "score"]):
        p.add("set", keys.coengagement(post), keys.encode_neighbours(nbrs, scores))

    counts = content.counts()
    p.add("hset", keys.INDEX_META, mapping={
        "as_of": content.as_of.isoformat(), "built_at": pd.Timestamp.now(tz="UTC").isoformat(), **counts,
    })
    p.flush()
    return counts


def build_candidate_index(state: StateDir, redis_url: str, as_of: datetime | pd.Timestamp | str,
                          tables: CanonicalTables | None = None, coengagement: pd.DataFrame | None = None,
                          sequence_length: int = DEFAULT_SEQUENCE_LENGTH) -> dict[str, int]:
    """Build (or rebuild, replacing) the candidate index in Redis from the state's canonical tables.

    Args:
        state: state folder whose ``tables/`` hold impressions, posts, social_edges (parquet).
        redis_url: e.g. ``redis://127.0.0.1:6390/0``.
        as_of: cutoff; only events strictly before it are used (tz-aware, or naive meaning UTC).
        tables: already loaded tables (skips reading ``state``), e.g. in tests.
        coengagement: co-engagement neighbours as of the same cutoff (``build_coengagement``
            computes them with Spark); None leaves the co-engagement lists empty.
        sequence_length: engaged posts kept per user in ``hm:{u:<user>}:seq``.

    Returns:
        counts per family (``posts``, ``authors``, ``popular_24h``, ``popular_7d``, ``tags``,
        ``follow_edges``, ``engaged_author_edges``, ``tag_interest_edges``, ``hated_author_edges``,
        ``seen_edges``, ``sequence_users``, ``sequence_events``, ``coengagement_posts``, ``users``).

    Raises:
        FileNotFoundError: a canonical table is missing.
        ValueError: a table lacks a needed column.
        redis.RedisError: Redis is unreachable.
    """
    t0 = time.perf_counter()
    tables = tables or CanonicalTables.load(state)
    content = compute_candidate_index(tables, as_of, coengagement, sequence_length)
    client = connect(redis_url)
    try:
        counts = write_candidate_index(client, content)
    finally:
        client.close()
    log.info("candidate index as of %s built in %.1f s: %s", content.as_of, time.perf_counter() - t0, counts)
    return counts


def build_coengagement(spark, tables: CanonicalTables, as_of: datetime | pd.Timestamp | str, *,
                       window: int | None = None, top_n: int | None = None, log=print) -> pd.DataFrame:
    """Co-engagement neighbours of every post from the users' full engagement sequences before
    ``as_of`` (Spark: ``pipelines.coengagement.coengagement_neighbours``); neighbours are posts
    created before ``as_of``. Pass the result to ``build_candidate_index``.

    Raises:
        ValueError: a table lacks a needed column.
    """
    from pipelines.coengagement import DEFAULT_TOP_N, DEFAULT_WINDOW, coengagement_neighbours

    cutoff = _as_utc(as_of)
    created = pd.to_datetime(tables.posts["created_ts"], utc=True)
    servable = tables.posts.loc[created < cutoff, "post_id"]
    sequences = engagement_sequences(tables.impressions, tables.prelog_events, cutoff)
    return coengagement_neighbours(spark, sequences, servable, window=DEFAULT_WINDOW if window is None else window,
                                   top_n=DEFAULT_TOP_N if top_n is None else top_n, log=log)
