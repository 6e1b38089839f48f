"""Out-of-network candidates: the posts with the most weighted engagement in a trailing window."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource


class PopularCandidateSource(CandidateSource):
    """Top ``max_candidates`` of ``hm:popular:{window}`` (weighted engagements before the index
    cutoff; ``pipelines/candidate_index.py``). The same list for every user: it is what a cold-start
    user is served. ``source_score`` = the popularity score.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, window: str = "7d",
                 timeout_ms: float = 50, name: str = "popular"):
        if window not in ("24h", "7d"):
            raise ValueError(f"popular window must be '24h' or '7d', got {window!r}")
        self.client = client
        self.max_candidates = max_candidates
        self.window = window
        self.timeout_ms = timeout_ms
        self.name = name

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score (author and created time come from the hydrator)."""
        rows = self.client.zrevrange(keys.popular(self.window), 0, self.max_candidates - 1, withscores=True)
        return [Candidate(post_id=int(pid), source=self.name, source_score=float(s)) for pid, s in rows]
