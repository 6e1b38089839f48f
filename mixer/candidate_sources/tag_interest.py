"""Out-of-network candidates: top posts of the user's strongest tags (interest graph by category)."""

from __future__ import annotations

import math

import redis

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource


class TagInterestCandidateSource(CandidateSource):
    """For the user's ``top_tags`` strongest tags, the most engaged posts of each tag.

    Each tag gets an equal quota of ``ceil(max_candidates / n_tags)`` from ``hm:tag_posts:{tag}``
    (one pipeline); a post in several tags is kept once. ``source_score`` = tag weight x (1 + post
    engagement score), so strong tags and popular posts lead. Empty for a user without tag history.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, top_tags: int = 5,
                 timeout_ms: float = 50, name: str = "tag_interest"):
        self.client = client
        self.max_candidates = max_candidates
        self.top_tags = top_tags
        self.timeout_ms = timeout_ms
        self.name = name

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score."""
        tags = sorted(query.tag_interests.items(), key=lambda kv: -kv[1])[: self.top_tags]
        if not tags:
            return []
        quota = math.ceil(self.max_candidates / len(tags))
        pipe = self.client.pipeline(transaction=False)
        for tag, _ in tags:
            pipe.zrevrange(keys.tag_posts(tag), 0, quota - 1, withscores=True)
        best: dict[int, float] = {}
        for (tag, weight), rows in zip(tags, pipe.execute()):
            for pid, score in rows:
                pid = int(pid)
                best[pid] = max(best.get(pid, 0.0), weight * (1.0 + float(score)))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[: self.max_candidates]
        return [Candidate(post_id=pid, source=self.name, source_score=s) for pid, s in ranked]
