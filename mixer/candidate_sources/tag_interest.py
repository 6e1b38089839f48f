"""Out-of-network candidates: top posts of the user's strongest tags (interest graph by category)."""

from __future__ import annotations

import math

import redis

from core import online_layout as keys
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, guarded
from mixer.candidate_sources.base import source_limit


class TagInterestCandidateSource(CandidateSource):
    """For the user's ``top_tags`` strongest tags, the most engaged posts of each tag.

    Each tag gets an equal quota of ``ceil(max_candidates / n_tags)`` from ``hm:tag_posts:{tag}``
    (one pipeline); a post in several tags is kept once. ``source_score`` = tag weight x (1 + post
    engagement score), so strong tags and popular posts lead. Empty for a user without tag history.

    With ``caches`` (the mixer's), each tag's list is read once per candidate-index version, up to
    ``max_candidates`` rows whatever the quota (the quota depends on the user's tag count; a
    cached list serves every quota), and the uncached tags of a request in one pipeline. While
    Redis is down the cached tags answer (``Fallback``: degraded).
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 400, top_tags: int = 5,
                 timeout_ms: float = 50, name: str = "tag_interest", *, caches: MixerCaches | None = None,
                 health: RedisHealth | None = None):
        self.client = client
        self.max_candidates = max_candidates
        self.top_tags = top_tags
        self.timeout_ms = timeout_ms
        self.name = name
        self.cache = caches.tag_posts if caches is not None and caches.enabled else None
        self.health = health

    def _read(self, tags: list[int], n: int) -> dict[int, list[tuple[int, float]]]:
        pipe = self.client.pipeline(transaction=False)
        for tag in tags:
            pipe.zrevrange(keys.tag_posts(tag), 0, n - 1, withscores=True)
        return {tag: [(int(pid), float(s)) for pid, s in rows] for tag, rows in zip(tags, pipe.execute())}

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score.

        Raises:
            redis.RedisError: Redis is unreachable (no cache).
            Fallback: Redis is unreachable; the candidates of the cached tags.
        """
        tags = sorted(query.tag_interests.items(), key=lambda kv: -kv[1])[: self.top_tags]
        if not tags:
            return []
        limit = source_limit(self, query)
        quota = math.ceil(limit / len(tags))
        cache, failed = self.cache, None
        if cache is None:
            lists = self._read([t for t, _ in tags], quota)
        else:
            version = cache.version
            lists, missing = cache.get_many([(t, limit) for t, _ in tags])
            lists = {t: rows for (t, _), rows in lists.items()}
            if missing:
                try:
                    read = guarded(self.health, lambda: self._read([t for t, _ in missing], limit))
                    cache.put_many({(t, limit): rows for t, rows in read.items()}, version)
                    lists.update(read)
                except redis.RedisError as e:
                    failed = e
        best: dict[int, float] = {}
        for tag, weight in tags:
            for pid, score in lists.get(tag, ())[:quota]:
                best[pid] = max(best.get(pid, 0.0), weight * (1.0 + score))
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[: limit]
        out = [Candidate(post_id=pid, source=self.name, source_score=s) for pid, s in ranked]
        if failed is not None:
            raise Fallback(out, f"Redis unavailable: {len(lists)} of {len(tags)} tags from the cache ({failed!r})")
        return out
