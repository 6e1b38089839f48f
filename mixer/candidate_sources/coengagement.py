"""Out-of-network candidates from the user's history: co-engagement neighbours of recent engagements."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, guarded


class CoEngagementCandidateSource(CandidateSource):
    """Expands the user's ``seed_posts`` most recent engagements (``Query.action_sequence``) through
    their co-engagement neighbours (``hm:coeng:{post}``, ``pipelines.coengagement``), as the-algorithm's
    UTEG expands a user's recent engagements over the user-tweet graph.

    ``source_score`` of a post = the sum of its similarities to the seeds (item-based CF scoring,
    Sarwar et al. WWW 2001); the user's own engaged posts are left out. Empty for a user without
    history (the popular source serves the cold start).

    With ``caches`` (the mixer's), each seed's neighbour list is read once per candidate-index
    version, and the uncached seeds of a request in one pipeline; while Redis is down the cached
    lists answer (``Fallback``: degraded).

    Args:
        max_candidates: posts returned (best first).
        seed_posts: latest engagements expanded.
        neighbours_per_seed: neighbours read per seed (the index keeps 50).
        timeout_ms: the runner's deadline for this source.

    Raises:
        ValueError: a count < 1.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 500, seed_posts: int = 20,
                 neighbours_per_seed: int = 50, timeout_ms: float = 50, name: str = "coengagement", *,
                 enabled: bool = True, caches: MixerCaches | None = None, health: RedisHealth | None = None):
        if min(max_candidates, seed_posts, neighbours_per_seed) < 1:
            raise ValueError(f"max_candidates, seed_posts and neighbours_per_seed must be >= 1, got "
                             f"{max_candidates}, {seed_posts}, {neighbours_per_seed}")
        self.client = client
        self.max_candidates = max_candidates
        self.seed_posts = seed_posts
        self.neighbours_per_seed = neighbours_per_seed
        self.timeout_ms = timeout_ms
        self.name = name
        self._enabled = enabled
        self.cache = caches.coengagement if caches is not None and caches.enabled else None
        self.health = health

    def enabled(self, query: Query) -> bool:
        """The config switch."""
        return self._enabled

    def _read(self, posts: list[int]) -> dict[int, list[tuple[int, float]]]:
        pipe = self.client.pipeline(transaction=False)
        for post in posts:
            pipe.zrevrange(keys.coengagement(post), 0, self.neighbours_per_seed - 1, withscores=True)
        return {post: [(int(n), float(s)) for n, s in rows] for post, rows in zip(posts, pipe.execute())}

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score, best first.

        Raises:
            redis.RedisError: Redis is unreachable (no cache).
            Fallback: Redis is unreachable; the candidates of the cached seeds.
        """
        seeds = [a.post_id for a in query.action_sequence[: self.seed_posts]]
        if not seeds:
            return []
        cache, failed = self.cache, None
        if cache is None:
            lists = self._read(seeds)
        else:
            version = cache.version
            found, missing = cache.get_many(seeds)
            lists = dict(found)
            if missing:
                try:
                    read = guarded(self.health, lambda: self._read(list(missing)))
                    cache.put_many(read, version)
                    lists.update(read)
                except redis.RedisError as e:
                    failed = e
        engaged = {a.post_id for a in query.action_sequence}
        score: dict[int, float] = {}
        for seed in seeds:
            for post, sim in lists.get(seed, ()):
                if post not in engaged:
                    score[post] = score.get(post, 0.0) + sim
        ranked = sorted(score.items(), key=lambda kv: (-kv[1], kv[0]))[: self.max_candidates]
        out = [Candidate(post_id=pid, source=self.name, source_score=s) for pid, s in ranked]
        if failed is not None:
            raise Fallback(out, f"Redis unavailable: {len(lists)} of {len(seeds)} seeds from the cache ({failed!r})")
        return out
