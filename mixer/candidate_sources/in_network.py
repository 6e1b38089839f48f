"""In-network candidates: recent posts of authors the user follows or engaged with."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, guarded


class InNetworkCandidateSource(CandidateSource):
    """Recent posts of the user's followed authors, then of the strongest engaged authors.

    Reads ``hm:author_posts:{author}`` (post -> created time) for up to ``max_authors`` authors,
    newest ``posts_per_author`` posts created before the request time each, in one pipeline.
    ``source_score`` = the author's engagement weight (followed authors with no engagement get the
    largest engaged weight + 1, so follows rank first, as Twitter's in-network source favours the
    follow graph). Keeps the ``max_candidates`` best by (source_score, created time).

    With ``caches`` (the mixer's), each author's list is read once per candidate-index version and
    the uncached authors of a request in one pipeline; only when the request time is at or after
    the index cutoff (``StoreVersions.index_as_of``), where "created before now" holds for every
    indexed post and the list does not depend on the request time. While Redis is down the cached
    authors answer (``Fallback``: degraded); an uncached read (no cache, or a request time inside
    the index) raises ``RedisUnavailable`` at once instead of waiting out its timeout.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, max_authors: int = 100,
                 posts_per_author: int = 20, timeout_ms: float = 50, name: str = "in_network", *,
                 caches: MixerCaches | None = None, health: RedisHealth | None = None):
        self.client = client
        self.max_candidates = max_candidates
        self.max_authors = max_authors
        self.posts_per_author = posts_per_author
        self.timeout_ms = timeout_ms
        self.name = name
        self.caches = caches if caches is not None and caches.enabled else None
        self.health = health

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
        caches, failed = self.caches, None
        as_of = caches.versions.index_as_of if caches is not None else None
        if as_of is None or query.now_s < as_of:  # no cache, or a request time inside the index
            lists = guarded(self.health, lambda: self._read([a for a, _ in authors], query.now_s))
        else:
            cache = caches.author_posts
            version = cache.version
            found, missing = cache.get_many([(a, self.posts_per_author) for a, _ in authors])
            lists = {a: rows for (a, _), rows in found.items()}
            if missing:
                try:
                    read = guarded(self.health, lambda: self._read([a for a, _ in missing], "+inf"))
                    cache.put_many({(a, self.posts_per_author): rows for a, rows in read.items()}, version)
                    lists.update(read)
                except redis.RedisError as e:
                    failed = e
        out = []
        for author, weight in authors:
            for pid, created in lists.get(author, ()):
                out.append(Candidate(post_id=pid, source=self.name, author_id=author,
                                     created_ts=created, in_network=True, source_score=weight))
        out.sort(key=lambda c: (-c.source_score, -c.created_ts))
        out = out[: self.max_candidates]
        if failed is not None:
            raise Fallback(out, f"Redis unavailable: {len(lists)} of {len(authors)} authors from the cache "
                                f"({failed!r})")
        return out

    def _read(self, authors: list[int], until) -> dict[int, list[tuple[int, float]]]:
        """Newest ``posts_per_author`` posts created at or before ``until`` per author, one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        for author in authors:
            pipe.zrevrangebyscore(keys.author_posts(author), until, "-inf",
                                  start=0, num=self.posts_per_author, withscores=True)
        return {a: [(int(pid), float(created)) for pid, created in posts]
                for a, posts in zip(authors, pipe.execute())}
