"""Social events -> the social graph in Redis (both directions) and the follow backfill.

``SocialGraphWriter`` is what the stream processor calls for each ``SocialGraphEvent`` (beside
``social.lua``, which keeps the mixer's ``follows`` / ``blocked`` / ``muted`` sets): it queues
``graph_edge.lua`` twice on the batch's pipeline, once on the acting user's keys (side ``out``) and
once on the other user's (side ``in``). Each half touches one user's keys (one Redis Cluster slot)
and has its own seen marker, so each is applied exactly once however often the event is delivered.
A mute changes no edge (``social.lua``'s muted set is read by the mixer).

After the batch, ``backfill`` copies a new followee's latest posts into the follower's home
timeline (Twitter does the same on follow), unless the followee is a celebrity (the read path pulls
those). It runs on every delivery of a follow whose edge exists then, so a redelivery repeats it
harmlessly (ZADD of an existing member changes nothing) and a failed backfill is retried with the
event. Key layout: ``core.online_layout``.
"""

from __future__ import annotations

import redis

from core import online_layout as keys
from pipelines.graph.config import FanoutSettings
from pipelines.streaming.events import SocialGraphEvent
from pipelines.streaming.scripts import GRAPH_EDGE, GraphEdgeArgs, GraphEdgeKeys


class SocialGraphWriter:
    """Applies social events to ``graph_followees`` / ``graph_followers`` and backfills follows.

    Args:
        client: ``redis.Redis`` of the online store.
        settings: ``fanout:`` settings (celebrity threshold, timeline length, backfill size, seen TTL).
    """

    def __init__(self, client: redis.Redis, settings: FanoutSettings | None = None):
        self.client = client
        self.settings = settings or FanoutSettings()
        self._edge = GRAPH_EDGE.register(client)

    def queue(self, event: SocialGraphEvent, pipe) -> int:
        """Queue the event's two halves on ``pipe``; returns how many results they add (2, or 0
        for a mute). Each result is 0 (half applied before), 1 (applied now) or 2 (stale)."""
        if event.action == "mute":
            return 0
        ets = f"{event.event_ts.timestamp():.6f}"
        ttl = self.settings.seen_ttl_s
        self._edge(GraphEdgeKeys.of(event.event_id, event.user_id),
                   GraphEdgeArgs(ttl, "out", event.action, event.author_id, ets), client=pipe)
        self._edge(GraphEdgeKeys.of(event.event_id, event.author_id),
                   GraphEdgeArgs(ttl, "in", event.action, event.user_id, ets), client=pipe)
        return 2

    def apply(self, event: SocialGraphEvent) -> tuple[int, ...]:
        """Apply one event now (both halves, then the backfill of a follow); returns the halves'
        results. Raises ``redis.RedisError`` on a failed write (safe to retry)."""
        pipe = self.client.pipeline(transaction=False)
        self.queue(event, pipe)
        out = tuple(int(r) for r in pipe.execute())
        if event.action == "follow":
            self.backfill([(event.user_id, event.author_id)])
        return out

    def backfill(self, pairs: list[tuple[int, int]]) -> int:
        """For each ``(follower, followee)`` whose edge exists now and whose followee has at most
        ``celebrity_threshold`` followers, ZADD the followee's latest ``backfill_posts`` posts into
        the follower's home timeline and trim it to ``timeline_length``. Two round trips for the
        whole list. Returns the entries newly added.

        Raises:
            redis.RedisError: a failed read or write (nothing is half-done in a way a retry cannot fix).
        """
        s = self.settings
        if not pairs or s.backfill_posts == 0:
            return 0
        pipe = self.client.pipeline(transaction=False)
        for user, author in pairs:
            pipe.sismember(keys.graph_followees(user), author)
            pipe.scard(keys.graph_followers(author))
            pipe.zrevrange(keys.user_posts(author), 0, s.backfill_posts - 1, withscores=True)
        got = pipe.execute()
        pipe = self.client.pipeline(transaction=False)
        n = 0
        for k, (user, _) in enumerate(pairs):
            follows, followers, posts = got[3 * k:3 * k + 3]
            if not follows or followers > s.celebrity_threshold or not posts:
                continue
            pipe.zadd(keys.home_timeline(user), dict(posts))
            pipe.zremrangebyrank(keys.home_timeline(user), 0, -s.timeline_length - 1)
            n += 1
        return sum(pipe.execute()[0::2]) if n else 0
