"""Out-of-network candidates trending now: the stream processor's forward-decayed engagement ranking."""

from __future__ import annotations

import redis

from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader


class TrendingCandidateSource(CandidateSource):
    """Top ``max_candidates`` of ``online_layout.RT_TRENDING_POSTS`` (weighted engagements with a 1 h
    half-life, updated per event by the stream processor), so a post taking off is retrieved
    minutes after it starts, not at the next candidate-index build. The same list for every user;
    empty until the stream processor has written. ``source_score`` = trending score at ``query.now_s``.

    Args:
        enabled: ``candidate_sources.trending.enabled``; False: never called (no source result).

    Raises:
        ValueError: ``max_candidates < 1``.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 200, timeout_ms: float = 50,
                 name: str = "trending", enabled: bool = True):
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.reader = RealtimeFeatureReader(client)
        self.max_candidates = max_candidates
        self.timeout_ms = timeout_ms
        self.name = name
        self.is_enabled = bool(enabled)

    def enabled(self, query: Query) -> bool:
        """The configured switch (the same for every query)."""
        return self.is_enabled

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score (author and created time come from the hydrator)."""
        return [Candidate(post_id=p, source=self.name, source_score=s)
                for p, s in self.reader.trending(query.now_s, k=self.max_candidates)]
