"""User context from Redis: follows, engaged authors, tags, hates, blocks, mutes, seen, served."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.candidate import Query
from mixer.components import QueryHydrator


def _ints(values) -> frozenset[int]:
    return frozenset(int(v) for v in values)


class UserContextQueryHydrator(QueryHydrator):
    """Reads the user's graph and history in one Redis round trip (a pipeline of 8 reads).

    Args:
        client: Redis holding the ``hm:`` index (``pipelines/candidate_index.py``).
        served_ttl_s: served posts older than this (wall-clock seconds) no longer count as served.
        max_engaged_authors: strongest engaged authors kept (bounds in-network fan-out).
        max_tags: strongest tag interests kept.
        wall_clock: returns wall time in epoch seconds; served records use wall time even when
            the ranking clock is fixed, because their TTL is real.
    """

    name = "user_context"

    def __init__(self, client: redis.Redis, served_ttl_s: float, max_engaged_authors: int = 200,
                 max_tags: int = 20, wall_clock: Callable[[], float] = time.time):
        self.client = client
        self.served_ttl_s = served_ttl_s
        self.max_engaged_authors = max_engaged_authors
        self.max_tags = max_tags
        self.wall_clock = wall_clock

    def hydrate(self, query: Query) -> Query:
        """Return ``query`` with follows, engaged_authors, tag_interests, hated_authors,
        blocked_authors, muted_authors, seen_posts and served_posts filled (empty for an unknown user: a cold start).

        Raises:
            redis.RedisError: Redis is unreachable (the request cannot be personalised; the API
                reports 503).
        """
        uid = query.user_id
        pipe = self.client.pipeline(transaction=False)
        pipe.smembers(keys.follows(uid))
        pipe.zrevrange(keys.engaged_authors(uid), 0, self.max_engaged_authors - 1, withscores=True)
        pipe.zrevrange(keys.tag_interest(uid), 0, self.max_tags - 1, withscores=True)
        pipe.smembers(keys.hated_authors(uid))
        pipe.smembers(keys.blocked_authors(uid))
        pipe.smembers(keys.muted_authors(uid))
        pipe.zrange(keys.seen_posts(uid), 0, -1)
        pipe.zrangebyscore(keys.served_posts(uid), self.wall_clock() - self.served_ttl_s, "+inf")
        follows, engaged, tags, hated, blocked, muted, seen, served = pipe.execute()
        return dataclasses.replace(
            query,
            follows=_ints(follows),
            engaged_authors={int(a): float(w) for a, w in engaged},
            tag_interests={int(t): float(w) for t, w in tags},
            hated_authors=_ints(hated),
            blocked_authors=_ints(blocked),
            muted_authors=_ints(muted),
            seen_posts=_ints(seen),
            served_posts=_ints(served),
        )
