"""The user action sequence: the user's last engaged posts (batch history and live appends)."""

from __future__ import annotations

import dataclasses

import redis

from core import online_layout as keys
from mixer.candidate import EngagedAction, Query
from mixer.components import Fallback, QueryHydrator
from mixer.redis_health import RedisHealth, guarded

from pipelines.sequences import ACTION_STRENGTH


class UserActionSequenceQueryHydrator(QueryHydrator):
    """Puts the user's last ``max_length`` engaged posts on the query (``Query.action_sequence``,
    newest first), read in one command from ``hm:{u:<user>}:seq``: the candidate index writes the
    history before its cutoff (``pipelines.sequences``: log and pre-log engagements), the stream
    processor appends live engagements (``engagement_batch.lua``, once per event id).

    The key holds one member per (post, action), up to 2N; a post engaged several times (a long
    view, then a like) keeps its newest entry, the strongest action on a tie, as
    ``pipelines.history_features`` does offline. While Redis is down the query goes on without a
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
        # twice the length: a post with two actions has two members
        rows = self.client.zrevrange(keys.action_sequence(uid), 0, 2 * self.max_length - 1, withscores=True)
        strength = {a: i for i, a in enumerate(ACTION_STRENGTH)}
        newest: dict[int, EngagedAction] = {}
        for member, ts in rows:
            post, author, action = keys.decode_action(member)
            seen = newest.get(post)
            if seen is None or (float(ts), strength.get(action, -1)) > (seen.ts, strength.get(seen.action, -1)):
                newest[post] = EngagedAction(post, author, action, float(ts))
        return tuple(sorted(newest.values(), key=lambda a: (-a.ts, a.post_id))[: self.max_length])

    def hydrate(self, query: Query) -> Query:
        """``query`` with ``action_sequence`` set (empty for an unknown user).

        Raises:
            Fallback: Redis is unreachable; the query with ``action_sequence`` None (unknown).
        """
        try:
            seq = guarded(self.health, lambda: self._read(query.user_id))
        except redis.RedisError as e:
            raise Fallback(dataclasses.replace(query, action_sequence=None),
                           f"Redis unavailable: no action sequence ({e!r})") from e
        return dataclasses.replace(query, action_sequence=seq)
