"""Records the posts a page served, so PreviouslySeenFilter drops them on the next request."""

from __future__ import annotations

import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.components import SideEffect, TimelineResult


class ServedPostsSideEffect(SideEffect):
    """``hm:served:{user_id}`` zset post_id -> wall-clock serve time (epoch s).

    One pipeline: ZADD the page, drop entries older than ``ttl_s``, keep the newest
    ``max_per_user``, and EXPIRE the key after ``ttl_s`` of inactivity.
    """

    name = "served_posts"

    def __init__(self, client: redis.Redis, ttl_s: int, max_per_user: int,
                 wall_clock: Callable[[], float] = time.time):
        self.client = client
        self.ttl_s = int(ttl_s)
        self.max_per_user = int(max_per_user)
        self.wall_clock = wall_clock

    def apply(self, result: TimelineResult) -> None:
        """Record ``result.items`` for ``result.query.user_id``.

        Raises:
            redis.RedisError: Redis is unreachable (the runner counts it and serves the page).
        """
        if not result.items:
            return
        now = self.wall_clock()
        key = keys.served_posts(result.query.user_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(key, {c.post_id: now for c in result.items})
        pipe.zremrangebyscore(key, "-inf", now - self.ttl_s)
        pipe.zremrangebyrank(key, 0, -(self.max_per_user + 1))
        pipe.expire(key, self.ttl_s)
        pipe.execute()
