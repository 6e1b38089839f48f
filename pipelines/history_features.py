"""History features of training rows, as serving computes them (``core.history_features``).

A row's features use only what the mixer would have had at its request's start (``request_ts``):

- the user action sequence: the engaged posts before ``request_ts`` (the index's history before
  its cutoff plus the stream processor's live appends since; ``pipelines.sequences``), the last
  ``SEQUENCE_LENGTH`` distinct posts of the last 2 x ``SEQUENCE_LENGTH`` engagements, newest
  first, as the mixer reads its 2N members. Exact while fewer than N live members were appended
  since the build (the key then holds every one); the tag of a post created after the build is
  unknown online (no post metadata), so it is -1 here too;
- the co-engagement neighbour lists of the index build serving the request. The index is rebuilt
  once per ``cadence`` (default daily at 00:00 UTC), so a row of day D reads the neighbours the Spark
  job (``pipelines.coengagement``) computes from the sequences before D's start. Using the
  neighbours of a later build would leak the row's own label: its engagement co-occurs with the
  user's earlier posts in every later table.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import pandas as pd

from core.history_features import (
    ATTENTION_LENGTH, HISTORY_FEATURES, SEED_POSTS, SEQUENCE_ID_FEATURES, SEQUENCE_LENGTH, history_feature_columns,
)
from core.id_features import sequence_bucket_rows
from pipelines.sequences import engagement_sequences

DEFAULT_CADENCE = "1D"
_EMPTY = (np.zeros(0, dtype="int64"), np.zeros(0, dtype="float64"))


def neighbour_lists(neighbours: pd.DataFrame) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``coengagement_neighbours`` output -> post -> (neighbour ids int64, similarities float64)
    (the features are sums, maxima and counts: the order inside a list does not matter)."""
    from pipelines.candidate_index import grouped_arrays

    return {post: (ids.astype("int64"), sims.astype("float64"))
            for post, (ids, sims) in grouped_arrays(neighbours, "post_id", ["neighbour_id", "score"])}


def add_history_features(spark, rows: pd.DataFrame, tables, *, cadence: str = DEFAULT_CADENCE,
                         sequence_length: int = SEQUENCE_LENGTH, seed_posts: int = SEED_POSTS,
                         neighbours_for: Callable[[pd.Timestamp], pd.DataFrame] | None = None,
                         log: Callable[[str], None] | None = print) -> pd.DataFrame:
    """``rows`` with the ``HISTORY_FEATURES`` and ``SEQUENCE_ID_FEATURES`` columns (float64) added
    (module docstring).

    Args:
        spark: the Spark session of the co-engagement job.
        rows: training rows with ``user_id``, ``post_id``, ``author_id``, ``tag_id`` (int) and
            ``request_ts`` (UTC).
        tables: ``pipelines.candidate_index.CanonicalTables`` (impressions, posts, prelog_events).
        cadence: how often the index is rebuilt (a pandas frequency; cutoffs are ``request_ts``
            floored to it).
        sequence_length, seed_posts: as the mixer's ``action_sequence.max_length`` and
            ``candidate_sources.coengagement.seed_posts``.
        neighbours_for: cutoff -> neighbours frame (default: the Spark job on ``tables``).
        log: progress lines (None: quiet).

    Returns:
        A copy of ``rows`` with the history columns.

    Raises:
        ValueError: a needed column is missing.
    """
    from pipelines.candidate_index import build_coengagement, grouped_arrays

    need = {"user_id", "post_id", "author_id", "tag_id", "request_ts"}
    missing = sorted(need - set(rows.columns))
    if missing:
        raise ValueError(f"rows lack columns {missing}: pass training-set rows (pipelines.training_set)")
    out = rows.copy()
    for name in HISTORY_FEATURES + SEQUENCE_ID_FEATURES:
        out[name] = np.zeros(len(out))
    if out.empty:
        return out
    request_ts = pd.to_datetime(out["request_ts"], utc=True)
    end = request_ts.max() + pd.Timedelta(microseconds=1)
    # every engagement: a post engaged before and after a request is in that request's sequence
    seq = engagement_sequences(tables.impressions, tables.prelog_events, end, distinct=False)
    posts_by_id = tables.posts.drop_duplicates("post_id").set_index("post_id")
    seq_tag = seq["post_id"].map(posts_by_id["primary_tag"]).fillna(-1).to_numpy(dtype="int64")
    # the mixer reads a sequence post's tag from the index's post metadata, which holds the posts
    # created before the build: a post created after it has no tag there (-1)
    created = pd.to_datetime(seq["post_id"].map(posts_by_id["created_ts"]), utc=True)
    seq_created = ((created - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).fillna(np.inf).to_numpy()
    # grouped_arrays sorts stably by user: each user's rows stay in time order
    by_user = dict(grouped_arrays(seq.assign(tag=seq_tag, created=seq_created), "user_id",
                                  ["ts", "post_id", "author_id", "tag", "created"]))
    fetch = neighbours_for or (lambda cutoff: build_coengagement(spark, tables, cutoff, log=None))
    req_s = ((request_ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy()
    cutoffs = request_ts.dt.floor(cadence)
    values = np.zeros((len(out), len(HISTORY_FEATURES)))
    seq_ids = np.zeros((len(out), len(SEQUENCE_ID_FEATURES)))
    posts = out["post_id"].to_numpy(dtype="int64")
    authors = out["author_id"].to_numpy(dtype="int64")
    cand_tags = out["tag_id"].to_numpy(dtype="int64")
    uids = out["user_id"].to_numpy(dtype="int64")
    for cutoff in sorted(cutoffs.unique()):
        t0 = time.perf_counter()
        cutoff_s = pd.Timestamp(cutoff).value / 1e9
        lists = neighbour_lists(fetch(pd.Timestamp(cutoff)))
        at = np.flatnonzero((cutoffs == cutoff).to_numpy())
        groups = pd.DataFrame({"u": uids[at], "t": req_s[at]}).groupby(["u", "t"], sort=False).indices
        for (u, t), idx in groups.items():
            rows_at = at[idx]
            hist = by_user.get(int(u))
            if hist is None:
                seq_posts = seq_authors = seq_tags = np.zeros(0, dtype="int64")
                seeds: list = []
            else:
                k = int(np.searchsorted(hist[0], t, side="left"))  # strictly before the request
                lo = max(0, k - 2 * sequence_length)  # as the mixer reads: 2N members, one per post, N kept
                rev = np.arange(k - 1, lo - 1, -1)  # newest first
                _, first = np.unique(hist[1][rev], return_index=True)
                keep = rev[np.sort(first)][:sequence_length]
                # ties in time in the mixer's order (newest first, then post id): the attention
                # positions are then the same; the history features are order-free
                keep = keep[np.lexsort((hist[1][keep], -hist[0][keep]))]
                seq_posts, seq_authors = hist[1][keep], hist[2][keep]
                seq_tags = np.where(hist[4][keep] < cutoff_s, hist[3][keep], -1)
                seeds = [lists.get(int(p), _EMPTY) for p in seq_posts[:seed_posts]]
            cols = history_feature_columns(seq_authors, seq_tags, seeds, posts[rows_at], authors[rows_at],
                                           cand_tags[rows_at])
            values[rows_at] = np.column_stack([cols[name] for name in HISTORY_FEATURES])
            seq_ids[rows_at] = sequence_bucket_rows(seq_posts, seq_authors, ATTENTION_LENGTH)
        if log is not None:
            log(f"history features as of the {pd.Timestamp(cutoff).isoformat()} index: {len(at):,} rows, "
                f"{len(groups):,} requests, {len(lists):,} neighbour lists in {time.perf_counter() - t0:.1f} s")
    for j, name in enumerate(HISTORY_FEATURES):
        out[name] = values[:, j]
    for j, name in enumerate(SEQUENCE_ID_FEATURES):
        out[name] = seq_ids[:, j]
    return out


__all__ = ["DEFAULT_CADENCE", "add_history_features", "neighbour_lists"]
