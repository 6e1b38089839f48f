"""The production sample for drift monitoring: a share of requests, with what the rankers saw and said.

For a sampled request, up to ``per_request`` of its heavy-ranked candidates (drawn uniformly, so
the sample is the candidates' distribution, not the page's) go to the capped Redis stream
``core.online_layout.DRIFT_SAMPLE``: ids, surface, arm, candidate source, request clock, model
versions, the light score, every head's probability, the blended score and the hydrated feature
row (float64 bytes in ``ALL_FEATURES`` order, ``core.feature_log``). ``monitoring.production``
reads it back for ``home-mixer monitor drift --window 1h``; the impression log and engagement
events join it later by (request_id, post_id) for labels.

Sampling is by request id (a hash), so a request is in or out as a whole and the decision is the
same in every worker.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Callable

import numpy as np
import redis

from core import online_layout as keys
from core.feature_log import FEATURE_SCHEMA_ID, encode_rows
from mixer.candidate import Query
from mixer.components import SideEffect, TimelineResult


def sampled(request_id: str, rate: float) -> bool:
    """True for a ``rate`` share of request ids (first 8 bytes of their SHA-1, uniform in [0, 1))."""
    if rate <= 0:
        return False
    if rate >= 1:
        return True
    h = int.from_bytes(hashlib.sha1(request_id.encode()).digest()[:8], "big")
    return h / 2**64 < rate


class DriftSampleSideEffect(SideEffect):
    """One pipelined ``XADD`` per sampled candidate of a sampled request (``MAXLEN ~ maxlen``).

    Args:
        client: Redis to write to.
        rate: share of requests sampled, in [0, 1] (default config 0.01).
        per_request: candidates kept per sampled request (>= 1; all when fewer were heavy-ranked).
        maxlen: approximate cap of the stream (entries, >= 1).
        enabled: ``drift_sample.enabled``.
        stream: the stream key; wall_clock: epoch seconds for ``sampled_at``.

    Raises:
        ValueError: rate outside [0, 1], per_request or maxlen < 1.
    """

    name = "drift_sample"

    def __init__(self, client: redis.Redis, rate: float, per_request: int, maxlen: int, *, enabled: bool = True,
                 stream: str = keys.DRIFT_SAMPLE, wall_clock: Callable[[], float] = time.time):
        if not 0 <= rate <= 1:
            raise ValueError(f"drift_sample.rate must be in [0, 1], got {rate}")
        if int(per_request) < 1 or int(maxlen) < 1:
            raise ValueError(f"drift_sample.per_request and stream_maxlen must be >= 1, got {per_request}, {maxlen}")
        self.client = client
        self.rate = float(rate)
        self.per_request = int(per_request)
        self.maxlen = int(maxlen)
        self.on = bool(enabled)
        self.stream = stream
        self.wall_clock = wall_clock

    def enabled(self, query: Query) -> bool:
        """``drift_sample.enabled`` and the request is in the sampled share."""
        return self.on and sampled(query.request_id, self.rate)

    def apply(self, result: TimelineResult) -> None:
        """Write the sampled candidates of ``result``.

        Raises:
            redis.RedisError: Redis is unreachable (the runner counts it and serves the page).
        """
        if result.ranked is None or result.features is None:
            return
        scored = [i for i, c in enumerate(result.ranked) if c.heads]
        if not scored:
            return
        q = result.query
        seed = int.from_bytes(hashlib.sha1(q.request_id.encode()).digest()[:4], "big")
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(scored, size=min(self.per_request, len(scored)), replace=False).tolist())
        rows = encode_rows(result.features.to_numpy(dtype=np.float64)[chosen])
        common = {
            "request_id": q.request_id, "user_id": q.user_id, "surface": q.surface, "arm": q.arm or "",
            "as_of": f"{q.now_s:.6f}", "sampled_at": f"{self.wall_clock():.3f}",
            "light_ranker_version": result.model_versions.get("light_ranker", ""),
            "heavy_ranker_version": result.model_versions.get("heavy_ranker", ""),
            "schema": FEATURE_SCHEMA_ID,
        }
        pipe = self.client.pipeline(transaction=False)
        for i, row in zip(chosen, rows):
            c = result.ranked[i]
            pipe.xadd(self.stream, {
                **common, "post_id": c.post_id, "author_id": c.author_id, "source": c.source,
                "light_score": f"{c.light_score:.9g}", "score": f"{c.score:.9g}",
                "heads": json.dumps({h: round(float(p), 9) for h, p in c.heads.items()}),
                "features": row,
            }, maxlen=self.maxlen, approximate=True)
        pipe.execute()
