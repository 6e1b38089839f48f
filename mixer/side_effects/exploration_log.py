"""Logs each exploring request's pool: what off-policy evaluation needs beyond the impressions.

An estimator (``models.ope``) replays every slot as a decision: which candidates were left in the
pool, which one was drawn with what propensity, and what a target policy would have given each
of them. The impression log has the served posts and their propensities; this stream adds the
pool itself, once per request.
"""

from __future__ import annotations

import json
import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.components import SideEffect, TimelineResult
from mixer.side_effects.write_buffer import RedisWriteBuffer, submit


class ExplorationLogSideEffect(SideEffect):
    """One XADD per request whose arm explores, to ``core.online_layout.EXPLORATION_LOG`` (capped,
    ``MAXLEN ~ maxlen``).

    Entry fields (strings): request_id, user_id, arm, surface, served_at (wall epoch s), as_of
    (ranking clock epoch s), policy (the arm's ``ExplorationSettings`` as JSON), light/heavy ranker
    versions, ``pool``: JSON list in pool order (best ranked first) of ``[post_id, score,
    light_score, {head: probability}]``, and ``slots``: JSON list in page order of ``[pool_index,
    propensity]``.

    Args:
        client: the online store.
        maxlen: approximate cap of the stream.
        policies: arm -> ``ExplorationSettings``; requests of other arms are not logged.
        buffer: the mixer's write buffer (entries wait there while Redis is down).
    """

    name = "exploration_log"

    def __init__(self, client: redis.Redis, maxlen: int, policies: dict, stream: str = keys.EXPLORATION_LOG,
                 wall_clock: Callable[[], float] = time.time, buffer: RedisWriteBuffer | None = None):
        self.client = client
        self.maxlen = int(maxlen)
        self.policies = {arm: s.model_dump_json() for arm, s in policies.items()}
        self.stream = stream
        self.wall_clock = wall_clock
        self.buffer = buffer

    def enabled(self, query) -> bool:
        """True when the query's arm explores."""
        return query.arm in self.policies

    def apply(self, result: TimelineResult) -> None:
        """Log the pool and the drawn slots of ``result``.

        Raises:
            redis.RedisError: Redis is unreachable and there is no buffer.
        """
        pool = sorted((c for c in (result.ranked or ()) if c.pool_index >= 0), key=lambda c: c.pool_index)
        if not pool or not result.items:
            return
        q = result.query
        versions = result.model_versions
        fields = {
            "request_id": q.request_id, "user_id": q.user_id, "arm": q.arm or "", "surface": q.surface,
            "served_at": f"{self.wall_clock():.3f}", "as_of": f"{q.now_s:.3f}", "policy": self.policies[q.arm],
            "light_ranker_version": versions.get("light_ranker", ""),
            "heavy_ranker_version": versions.get("heavy_ranker", ""),
            "pool": json.dumps([[c.post_id, c.score, c.light_score, c.heads] for c in pool]),
            "slots": json.dumps([[c.pool_index, c.propensity] for c in result.items if c.pool_index >= 0]),
        }
        stream, maxlen = self.stream, self.maxlen

        def ops(pipe) -> None:
            pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)

        submit(self.client, self.buffer, self.name, ops, "exploration pools")
