"""The user action sequence: the user's last engaged posts, batch history merged with live ones."""

from __future__ import annotations

import dataclasses

import redis

from core import online_layout as keys
from mixer.candidate import EngagedAction, Query
from mixer.components import Fallback, QueryHydrator
from mixer.redis_health import RedisHealth, guarded

LIVE_ACTION = "engaged"  # the stream processor's recent-posts list records no action kind


class UserActionSequenceQueryHydrator(QueryHydrator):
    """Puts the user's last ``max_length`` engagements on the query (``Query.action_sequence``,
    newest first), read in one round trip from:

    - ``hm:seq:{user}``: the engaged posts the candidate index built from the log and the pre-log
      history (``pipelines.sequences``: post, author, action, time);
    - ``hm:rt:user:{user}:posts``: the posts the stream processor saw the user engage with since
      (applied once per event id by ``engagement.lua``), action ``"engaged"``, author unknown (-1).

    A post in both keeps its newest entry. While Redis is down the query goes on without a
    sequence (``Fallback``: degraded "query_hydration"): the history-based sources return nothing
    and the others still serve, which is better than no page.

    Args:
        client: Redis with the candidate index and the stream processor's keys.
        max_length: entries kept (>= 1; the index stores ``DEFAULT_SEQUENCE_LENGTH`` = 64 per user).
        enabled: config switch.
        health: fails fast while Redis is down.

    Raises:
        ValueError: ``max_length < 1``.
    """

    name = "action_sequence"

    def __init__(self, client: redis.Redis, max_length: int = 64, *, enabled: bool = True,
                 health: RedisHealth | None = None):
        if max_length < 1:
            raise ValueError(f"the action sequence length must be >= 1, got {max_length}")
        self.client = client
        self.max_length = int(max_length)
        self._enabled = enabled
        self.health = health

    def enabled(self, query: Query) -> bool:
        """The config switch."""
        return self._enabled

    def _read(self, uid: int) -> tuple[EngagedAction, ...]:
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(keys.action_sequence(uid), 0, self.max_length - 1, withscores=True)
        pipe.zrevrange(keys.rt_user_recent_posts(uid), 0, self.max_length - 1, withscores=True)
        batch, live = pipe.execute()
        newest: dict[int, EngagedAction] = {}
        for member, ts in batch:
            post, author, action = keys.decode_action(member)
            newest[post] = EngagedAction(post, author, action, float(ts))
        for post, ts in live:
            post = int(post)
            if post not in newest or newest[post].ts < float(ts):
                author = newest[post].author_id if post in newest else -1
                newest[post] = EngagedAction(post, author, LIVE_ACTION, float(ts))
        return tuple(sorted(newest.values(), key=lambda a: (-a.ts, a.post_id))[: self.max_length])

    def hydrate(self, query: Query) -> Query:
        """``query`` with ``action_sequence`` set (empty for an unknown user).

        Raises:
            Fallback: Redis is unreachable; the query without a sequence.
        """
        try:
            seq = guarded(self.health, lambda: self._read(query.user_id))
        except redis.RedisError as e:
            raise Fallback(query, f"Redis unavailable: no action sequence ({e!r})") from e
        return dataclasses.replace(query, action_sequence=seq)
