"""Out-of-network candidates: the posts with the most weighted engagement in a trailing window."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.caches import MISSING, MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, guarded
from mixer.candidate_sources.base import source_limit


class PopularCandidateSource(CandidateSource):
    """Top ``max_candidates`` of ``hm:popular:{window}`` (weighted engagements before the index
    cutoff; ``pipelines/candidate_index.py``). The same list for every user: it is what a cold-start
    user is served. ``source_score`` = the popularity score.

    With ``caches`` (the mixer's), the list is read once per candidate-index version
    (``MixerCaches.popular``) and, while Redis is down, served from there (a miss then answers
    ``Fallback([])``: degraded, no candidates). ``health`` fails fast while Redis is down.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, window: str = "7d",
                 timeout_ms: float = 50, name: str = "popular", *, caches: MixerCaches | None = None,
                 health: RedisHealth | None = None):
        if window not in ("24h", "7d"):
            raise ValueError(f"popular window must be '24h' or '7d', got {window!r}")
        self.client = client
        self.max_candidates = max_candidates
        self.window = window
        self.timeout_ms = timeout_ms
        self.name = name
        self.cache = caches.popular if caches is not None and caches.enabled else None
        self.health = health

    def _read(self, n: int) -> list[tuple[int, float]]:
        rows = self.client.zrevrange(keys.popular(self.window), 0, n - 1, withscores=True)
        return [(int(pid), float(s)) for pid, s in rows]

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score (author and created time come from the hydrator).

        Raises:
            redis.RedisError: Redis is unreachable (no cache).
            Fallback: Redis is unreachable and nothing is cached (no candidates).
        """
        cache, limit = self.cache, source_limit(self, query)
        if cache is None:
            rows = self._read(limit)
        else:
            key = (self.window, limit)
            version = cache.version
            rows = cache.get(key)
            if rows is MISSING:
                try:
                    rows = guarded(self.health, lambda: self._read(limit))
                except redis.RedisError as e:
                    raise Fallback([], f"Redis unavailable and no cached popular list: {e!r}") from e
                cache.put(key, rows, version)
        return [Candidate(post_id=pid, source=self.name, source_score=s) for pid, s in rows]
