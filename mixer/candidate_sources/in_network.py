"""In-network candidates: recent posts of authors the user follows or engaged with."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource


class InNetworkCandidateSource(CandidateSource):
    """Recent posts of the user's followed authors, then of the strongest engaged authors.

    Reads ``hm:author_posts:{author}`` (post -> created time) for up to ``max_authors`` authors,
    newest ``posts_per_author`` posts created before the request time each, in one pipeline.
    ``source_score`` = the author's engagement weight (followed authors with no engagement get the
    largest engaged weight + 1, so follows rank first, as Twitter's in-network source favours the
    follow graph). Keeps the ``max_candidates`` best by (source_score, created time).
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, max_authors: int = 100,
                 posts_per_author: int = 20, timeout_ms: float = 50, name: str = "in_network"):
        self.client = client
        self.max_candidates = max_candidates
        self.max_authors = max_authors
        self.posts_per_author = posts_per_author
        self.timeout_ms = timeout_ms
        self.name = name

    def _authors(self, query: Query) -> list[tuple[int, float]]:
        top = max(query.engaged_authors.values(), default=0.0) + 1.0
        weights = {a: query.engaged_authors.get(a, 0.0) + top for a in query.follows}
        for a, w in query.engaged_authors.items():  # strongest first (zrevrange order)
            weights.setdefault(a, w)
        ranked = sorted(weights.items(), key=lambda kv: -kv[1])
        return ranked[: self.max_authors]

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with author_id, created_ts and in_network=True already set."""
        authors = self._authors(query)
        if not authors:
            return []
        pipe = self.client.pipeline(transaction=False)
        for author, _ in authors:
            pipe.zrevrangebyscore(keys.author_posts(author), query.now_s, "-inf",
                                  start=0, num=self.posts_per_author, withscores=True)
        out = []
        for (author, weight), posts in zip(authors, pipe.execute()):
            for pid, created in posts:
                out.append(Candidate(post_id=int(pid), source=self.name, author_id=author,
                                     created_ts=float(created), in_network=True, source_score=weight))
        out.sort(key=lambda c: (-c.source_score, -c.created_ts))
        return out[: self.max_candidates]
