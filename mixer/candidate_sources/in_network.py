"""In-network candidates: recent posts of authors the user follows or engaged with.

Two reads (``candidate_sources.in_network.read``):

- ``index``: the candidate index's per-author post lists of the followed and engaged authors,
  pulled at request time (the KuaiRand log's follows are too few for a timeline of their own);
- ``timeline``: the user's pushed home timeline (fan-out workers, ``pipelines.graph.fanout``) merged
  with the latest posts of the followed celebrities, pulled (at most ``fanout.max_celebrity_pulls``,
  strongest edges first), with deletes, unfollows, blocks and mutes applied
  (``pipelines.graph.timeline.HomeTimelineReader``): Twitter's hybrid push / pull.
"""

from __future__ import annotations

import redis

from core import online_layout as keys
from pipelines.graph.timeline import HomeTimelineReader
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, guarded
from mixer.candidate_sources.base import source_limit


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
                 caches: MixerCaches | None = None, health: RedisHealth | None = None, read: str = "index",
                 max_celebrity_pulls: int = 50):
        if read not in ("index", "timeline"):
            raise ValueError(f"read must be 'index' or 'timeline', got {read!r}")
        self.client = client
        self.read = read
        self.max_celebrity_pulls = max_celebrity_pulls
        self._timeline = HomeTimelineReader(client) if read == "timeline" else None
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
        if self._timeline is not None:
            return self._fetch_timeline(query)
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
        out = out[: source_limit(self, query)]
        if failed is not None:
            raise Fallback(out, f"Redis unavailable: {len(lists)} of {len(authors)} authors from the cache "
                                f"({failed!r})")
        return out

    def _fetch_timeline(self, query: Query) -> list[Candidate]:
        """The pushed timeline plus celebrity pulls (module docstring). ``source_score`` = the
        author's engagement weight + 1 (every author here is followed), as in the index read.
        Timelines change with every post, so nothing is cached: while Redis is down this raises
        (``RedisUnavailable`` at once) and the runner fails the source open."""
        strength = query.engaged_authors
        got = guarded(self.health, lambda: self._timeline.read(
            query.user_id, source_limit(self, query), until=query.now_s, blocked=query.blocked_authors,
            muted=query.muted_authors, strength=strength, max_celebrity_pulls=self.max_celebrity_pulls,
            posts_per_celebrity=self.posts_per_author))
        return [Candidate(post_id=e.post_id, source=self.name, author_id=e.author_id, created_ts=e.created_ts,
                          in_network=True, source_score=strength.get(e.author_id, 0.0) + 1.0,
                          source_detail="pulled" if e.post_id in got.pulled else "pushed")
                for e in got.entries]

    def _read(self, authors: list[int], until) -> dict[int, list[tuple[int, float]]]:
        """Newest ``posts_per_author`` posts created at or before ``until`` per author, one pipeline."""
        pipe = self.client.pipeline(transaction=False)
        for author in authors:
            pipe.zrevrangebyscore(keys.author_posts(author), until, "-inf",
                                  start=0, num=self.posts_per_author, withscores=True)
        return {a: [(int(pid), float(created)) for pid, created in posts]
                for a, posts in zip(authors, pipe.execute())}
