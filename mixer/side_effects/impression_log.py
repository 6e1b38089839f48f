"""Appends each served post to the ``hm:served_impressions`` Redis stream (future training data)."""

from __future__ import annotations

import json
import time
from typing import Callable

import redis

from core import online_layout as keys
from mixer.components import SideEffect, TimelineResult
from mixer.side_effects.write_buffer import RedisWriteBuffer, submit


class ImpressionLogSideEffect(SideEffect):
    """One XADD per served item, capped at about ``maxlen`` entries (``MAXLEN ~``).

    Entry fields (strings): request_id, user_id, post_id, author_id, position (0-based), score,
    light_score, heads (JSON), arm, source, in_network (0/1), page_index, surface (the request's
    surface id, the log's ``tab``: training sets built from this stream need it), served_at (wall epoch s),
    as_of (ranking clock epoch s), light_ranker_version, heavy_ranker_version, propensity (the
    probability the post had of its slot: 1 unless the arm explores, ``ExplorationSelector``),
    pool_index (its place in the exploration pool, -1 outside one), team (an interleaving arm's
    team arm that placed the post, empty otherwise), experiment (the experiment id),
    and the request's guardrail fields: pipeline_ms (wall time of its stages up to the side
    effects), degraded (the stages that failed open, comma-separated) and fallback (1 when a ranker
    was scored by the in-process fallback).

    With a ``buffer`` (the mixer's), entries Redis cannot take wait there in order and are
    appended when Redis answers again (``RedisWriteBuffer``; ``served_at`` stays the serve time);
    the page is served degraded "side_effects".
    """

    name = "impression_log"

    def __init__(self, client: redis.Redis, maxlen: int, stream: str = keys.SERVED_IMPRESSIONS,
                 wall_clock: Callable[[], float] = time.time, buffer: RedisWriteBuffer | None = None,
                 experiment_id: str = ""):
        self.client = client
        self.experiment_id = experiment_id
        self.buffer = buffer
        self.maxlen = int(maxlen)
        self.stream = stream
        self.wall_clock = wall_clock

    def apply(self, result: TimelineResult) -> None:
        """Log ``result.items``.

        Raises:
            redis.RedisError: Redis is unreachable and there is no buffer (the runner counts it and
                serves the page).
            Fallback: the entries were buffered (Redis unreachable).
        """
        if not result.items:
            return
        q = result.query
        served_at = f"{self.wall_clock():.3f}"
        versions = result.model_versions
        pipeline_ms = f"{sum(result.timings_ms.values()):.3f}"
        degraded = ",".join(result.degraded)
        fallback = int(any(p.endswith("fallback") for p in result.scoring_paths.values()))
        entries = []
        for pos, c in enumerate(result.items):
            entries.append({
                "request_id": q.request_id, "user_id": q.user_id, "post_id": c.post_id,
                "author_id": c.author_id, "position": pos, "score": repr(c.score),
                "light_score": repr(c.light_score), "heads": json.dumps(c.heads), "arm": q.arm or "",
                "source": c.source, "in_network": int(c.in_network), "page_index": q.page_index,
                "surface": q.surface,
                "served_at": served_at, "as_of": f"{q.now_s:.3f}",
                "light_ranker_version": versions.get("light_ranker", ""),
                "heavy_ranker_version": versions.get("heavy_ranker", ""),
                "propensity": repr(c.propensity), "pool_index": c.pool_index, "team": c.team,
                "experiment": self.experiment_id, "pipeline_ms": pipeline_ms, "degraded": degraded,
                "fallback": fallback,
            })
        stream, maxlen = self.stream, self.maxlen

        def ops(pipe) -> None:
            for fields in entries:
                pipe.xadd(stream, fields, maxlen=maxlen, approximate=True)

        submit(self.client, self.buffer, self.name, ops, "impressions")
