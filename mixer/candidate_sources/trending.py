"""Out-of-network candidates trending now: the stream processor's forward-decayed engagement ranking."""

from __future__ import annotations

import redis

from mixer.caches import MISSING, MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
from mixer.redis_health import RedisHealth, guarded
from mixer.candidate_sources.base import source_limit


class TrendingCandidateSource(CandidateSource):
    """Top ``max_candidates`` of ``online_layout.RT_TRENDING_POSTS`` (weighted engagements with a 1 h
    half-life, updated per event by the stream processor), so a post taking off is retrieved
    minutes after it starts, not at the next candidate-index build. The same list for every user;
    empty until the stream processor has written. ``source_score`` = trending score at ``query.now_s``.

    Args:
        enabled: ``candidate_sources.trending.enabled``; False: never called (no source result).
        caches: the mixer's; the last list read is kept (``MixerCaches.trending``, last-known-good
            only: trending is real time, so it is read per request while Redis answers) and
            served with the scores it had while Redis is down (``Fallback``).
        health: fails fast while Redis is down.

    Raises:
        ValueError: ``max_candidates < 1``.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 200, timeout_ms: float = 50,
                 name: str = "trending", enabled: bool = True, *, caches: MixerCaches | None = None,
                 health: RedisHealth | None = None):
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.reader = RealtimeFeatureReader(client)
        self.max_candidates = max_candidates
        self.timeout_ms = timeout_ms
        self.name = name
        self.is_enabled = bool(enabled)
        self.lkg = caches.trending if caches is not None else None
        self.health = health

    def enabled(self, query: Query) -> bool:
        """The configured switch (the same for every query)."""
        return self.is_enabled

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score (author and created time come from the hydrator)."""
        limit = source_limit(self, query)
        if self.lkg is None:
            rows = self.reader.trending(query.now_s, k=limit)
        else:
            try:
                rows = guarded(self.health, lambda: self.reader.trending(query.now_s, k=limit))
            except redis.RedisError as e:
                last = self.lkg.get(limit, lkg=True)
                cands = [] if last is MISSING else [Candidate(post_id=p, source=self.name, source_score=s)
                                                     for p, s in last]
                raise Fallback(cands, f"Redis unavailable: last-known trending list ({e!r})") from e
            self.lkg.put(limit, rows, "lkg")
        return [Candidate(post_id=p, source=self.name, source_score=s) for p, s in rows]
