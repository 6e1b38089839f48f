"""The social graph in Redis: bulk loads, counts, pages of followers, post deletes.

Writes of single events go through ``SocialGraphWriter`` (the stream processor); this module is
for what is not an event: loading a whole edge list (a SNAP file, a generated graph, KuaiRand's
edges), reading counts and followers, and deleting a post. Key layout: ``core.online_layout``
(every key hash-tagged by user).
"""

from __future__ import annotations

import time
from typing import Callable, Iterator

import numpy as np
import redis

from core import online_layout as keys

# Keys per UNLINK of ``clear``; members per SADD of a bulk load (one command stays a few hundred KB).
LOAD_BATCH_COMMANDS = 10_000
MAX_SADD_MEMBERS = 10_000


class SocialGraphStore:
    """Reads and bulk-writes the follow graph (``graph_followees`` / ``graph_followers``).

    Args:
        client: ``redis.Redis`` of the online store.
    """

    def __init__(self, client: redis.Redis):
        self.client = client

    def load_edges(self, follower: np.ndarray, followee: np.ndarray, *, batch_members: int = 200_000,
                   progress: Callable[[int], None] | None = None) -> int:
        """SADD every edge ``follower[i] -> followee[i]`` in both directions, pipelined: each
        direction is sorted by its key user once, so a user's set is written by one SADD (split
        every ``MAX_SADD_MEMBERS`` members for celebrities) and a load of E edges over N users
        costs about 2N commands in round trips of ``batch_members`` members.

        Idempotent (SADD): loading a file twice leaves the same sets. Self-loops are skipped.

        Args:
            follower, followee: int64 arrays of equal length (user ids >= 0).
            batch_members: set members per pipelined round trip.
            progress: called with the number of members written after each round trip (2 per
                edge: both directions), for a progress bar.

        Returns:
            The number of edges written (self-loops excluded).

        Raises:
            ValueError: arrays of different lengths or negative ids.
        """
        follower = np.asarray(follower, dtype=np.int64)
        followee = np.asarray(followee, dtype=np.int64)
        if follower.shape != followee.shape:
            raise ValueError(f"follower and followee differ in length: {follower.shape} vs {followee.shape}")
        if follower.size and min(follower.min(), followee.min()) < 0:
            raise ValueError("user ids must be >= 0")
        keep = follower != followee
        follower, followee = follower[keep], followee[keep]
        for key_of, by, other in ((keys.graph_followees, follower, followee),
                                  (keys.graph_followers, followee, follower)):
            pipe, queued = self.client.pipeline(transaction=False), 0
            for user, members in _grouped(by, other):
                for start in range(0, len(members), MAX_SADD_MEMBERS):
                    part = members[start:start + MAX_SADD_MEMBERS]
                    pipe.sadd(key_of(user), *part)
                    queued += len(part)
                if queued >= batch_members:
                    pipe.execute()
                    if progress is not None:
                        progress(queued)
                    pipe, queued = self.client.pipeline(transaction=False), 0
            if queued:
                pipe.execute()
                if progress is not None:
                    progress(queued)
        return int(follower.size)

    def counts(self, user_ids: list[int]) -> list[tuple[int, int]]:
        """``(followers, followees)`` of each user, one pipelined round trip (``SCARD``, O(1))."""
        pipe = self.client.pipeline(transaction=False)
        for u in user_ids:
            pipe.scard(keys.graph_followers(u))
            pipe.scard(keys.graph_followees(u))
        got = pipe.execute()
        return [(int(got[2 * i]), int(got[2 * i + 1])) for i in range(len(user_ids))]

    def followees(self, user_id: int) -> set[int]:
        """The authors ``user_id`` follows."""
        return {int(a) for a in self.client.smembers(keys.graph_followees(user_id))}

    def follower_pages(self, author_id: int, page_size: int, cursor: int = 0) -> Iterator[tuple[int, list[int]]]:
        """The author's followers in pages: ``(next_cursor, follower ids)`` per ``SSCAN`` call,
        starting at ``cursor`` (0 = the beginning); the last page has ``next_cursor == 0``.

        ``SSCAN`` returns every follower present for the whole scan at least once (a follower may
        repeat across pages when the set is rehashed: writes are idempotent) and its cursor is
        stateless, so a restarted worker resumes from a saved cursor. ``page_size`` is a hint.
        """
        while True:
            cursor, members = self.client.sscan(keys.graph_followers(author_id), cursor, count=page_size)
            yield int(cursor), [int(m) for m in members]
            if int(cursor) == 0:
                return

    def delete_post(self, post_id: int, author_id: int, deleted_at: float | None = None) -> None:
        """Delete a post: drop it from the author's own timeline and add a tombstone
        (``DELETED_POSTS``) that the read path honours; copies in home timelines are removed
        lazily when read (``HomeTimelineReader``), not by a fan-out of deletes. Idempotent."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrem(keys.user_posts(author_id), keys.encode_timeline_entry(post_id, author_id))
        # NX: a redelivered or repeated delete keeps the first deletion time
        pipe.zadd(keys.DELETED_POSTS, {str(int(post_id)): time.time() if deleted_at is None else deleted_at}, nx=True)
        pipe.execute()

    def snapshot(self, scan_count: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
        """Every follow edge now in Redis, as ``(follower, followee)`` int64 arrays sorted by
        follower then followee: the graph as the loaders and the stream processor left it, for the
        canonical ``follow_graph`` table (``home-mixer graph export``). One ``SCAN`` of the followee
        sets and pipelined ``SMEMBERS``; not atomic (edges changing meanwhile may or may not be in)."""
        src, dst = [], []
        batch: list = []

        def flush():
            pipe = self.client.pipeline(transaction=False)
            for key in batch:
                pipe.smembers(key)
            for key, members in zip(batch, pipe.execute()):
                if members:
                    dst.append(np.fromiter((int(m) for m in members), dtype=np.int64, count=len(members)))
                    src.append(np.full(len(members), keys.graph_key_user(key), dtype=np.int64))
            batch.clear()

        for key in self.client.scan_iter(match=keys.GRAPH_FOLLOWEES_PATTERN, count=scan_count):
            batch.append(key)
            if len(batch) >= LOAD_BATCH_COMMANDS:
                flush()
        if batch:
            flush()
        if not src:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        follower, followee = np.concatenate(src), np.concatenate(dst)
        order = np.lexsort((followee, follower))
        return follower[order], followee[order]

    def clear(self) -> int:
        """Delete every graph and timeline key (``GRAPH_KEY_PATTERNS``); returns how many."""
        n = 0
        for pattern in keys.GRAPH_KEY_PATTERNS:
            batch = []
            for key in self.client.scan_iter(match=pattern, count=10_000):
                batch.append(key)
                if len(batch) >= LOAD_BATCH_COMMANDS:
                    n += self.client.unlink(*batch)
                    batch = []
            if batch:
                n += self.client.unlink(*batch)
        return n


def _grouped(by: np.ndarray, other: np.ndarray) -> Iterator[tuple[int, list[int]]]:
    """``(user, [other ids])`` for each distinct value of ``by`` (a stable sort, numpy; skipped
    when ``by`` is already sorted, as a generated graph's followers are)."""
    if by.size and not (by[1:] >= by[:-1]).all():
        order = np.argsort(by, kind="stable")
        by, other = by[order], other[order]
    if by.size == 0:
        return
    bounds = np.flatnonzero(np.diff(by)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [by.size]))
    for s, e in zip(starts.tolist(), ends.tolist()):
        yield int(by[s]), other[s:e].tolist()
