"""User context from Redis: follows, engaged authors, tags, hates, blocks, mutes, seen, served."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.caches import MISSING, MixerCaches
from mixer.candidate import Query
from mixer.components import Fallback, QueryHydrator
from mixer.redis_health import RedisHealth, guarded


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
        caches: the mixer's; each user's last context is kept (``MixerCaches.user_context``,
            bounded, last-known-good only: the context changes per event, so it is read per
            request while Redis answers) for Redis outages.
        health: fails fast while Redis is down.

    While Redis is down, ``hydrate`` raises ``Fallback`` with the user's last-known context
    (reported degraded "query_hydration"). For a user this process has not served it re-raises the
    Redis error (the API answers 503): without the user's blocks, mutes and hated authors a page
    could show exactly the authors the user asked never to see, and safety beats availability.
    """

    name = "user_context"

    def __init__(self, client: redis.Redis, served_ttl_s: float, max_engaged_authors: int = 200,
                 max_tags: int = 20, wall_clock: Callable[[], float] = time.time, *,
                 caches: MixerCaches | None = None, health: RedisHealth | None = None):
        self.client = client
        self.lkg = caches.user_context if caches is not None and caches.settings.user_context_entries > 0 else None
        self.health = health
        self.served_ttl_s = served_ttl_s
        self.max_engaged_authors = max_engaged_authors
        self.max_tags = max_tags
        self.wall_clock = wall_clock

    def hydrate(self, query: Query) -> Query:
        """Return ``query`` with follows, engaged_authors, tag_interests, hated_authors,
        blocked_authors, muted_authors, seen_posts and served_posts filled (empty for an unknown user: a cold start).

        Raises:
            redis.RedisError: Redis is unreachable and no ``caches`` were given, or this user's
                context is not cached.
            Fallback: Redis is unreachable and the user's last-known context is cached.
        """
        if self.lkg is None:
            return dataclasses.replace(query, **self._read(query.user_id))
        try:
            context = guarded(self.health, lambda: self._read(query.user_id))
        except redis.RedisError as e:
            last = self.lkg.get(query.user_id, lkg=True)
            if last is MISSING:  # unknown blocks and mutes: no page rather than an unsafe one
                raise
            raise Fallback(dataclasses.replace(query, **last), f"Redis unavailable: last-known context ({e!r})") from e
        self.lkg.put(query.user_id, context, "lkg")
        return dataclasses.replace(query, **context)

    def _read(self, uid: int) -> dict:
        """The context fields of ``uid`` (one pipeline)."""
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
        return dict(
            follows=_ints(follows),
            engaged_authors={int(a): float(w) for a, w in engaged},
            tag_interests={int(t): float(w) for t, w in tags},
            hated_authors=_ints(hated),
            blocked_authors=_ints(blocked),
            muted_authors=_ints(muted),
            seen_posts=_ints(seen),
            served_posts=_ints(served),
        )
