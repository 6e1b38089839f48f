"""Records the posts a page served, so PreviouslySeenFilter drops them on the next request."""

from __future__ import annotations

import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.components import SideEffect, TimelineResult
from mixer.side_effects.write_buffer import RedisWriteBuffer, submit


class ServedPostsSideEffect(SideEffect):
    """``hm:served:{user_id}`` zset post_id -> wall-clock serve time (epoch s).

    One pipeline: ZADD the page, drop entries older than ``ttl_s``, keep the newest
    ``max_per_user``, and EXPIRE the key after ``ttl_s`` of inactivity.

    With a ``buffer`` (the mixer's), a write Redis cannot take waits there and is flushed when
    Redis answers again (``RedisWriteBuffer``); the page is served degraded "side_effects".
    """

    name = "served_posts"

    def __init__(self, client: redis.Redis, ttl_s: int, max_per_user: int,
                 wall_clock: Callable[[], float] = time.time, buffer: RedisWriteBuffer | None = None):
        self.client = client
        self.buffer = buffer
        self.ttl_s = int(ttl_s)
        self.max_per_user = int(max_per_user)
        self.wall_clock = wall_clock

    def apply(self, result: TimelineResult) -> None:
        """Record ``result.items`` for ``result.query.user_id``.

        Raises:
            redis.RedisError: Redis is unreachable and there is no buffer (the runner counts it and
                serves the page).
            Fallback: the write was buffered (Redis unreachable).
        """
        if not result.items:
            return
        now = self.wall_clock()
        key = keys.served_posts(result.query.user_id)
        members = {c.post_id: now for c in result.items}
        ttl_s, keep = self.ttl_s, self.max_per_user

        def ops(pipe) -> None:
            pipe.zadd(key, members)
            pipe.zremrangebyscore(key, "-inf", now - ttl_s)
            pipe.zremrangebyrank(key, 0, -(keep + 1))
            pipe.expire(key, ttl_s)

        submit(self.client, self.buffer, self.name, ops, "served posts")
