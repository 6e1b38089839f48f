"""Out-of-network candidates from the user's history: co-engagement neighbours of recent engagements."""

from __future__ import annotations

import numpy as np
import redis

from core import online_layout as keys
from core.history_features import coengagement_scores
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateSource, Fallback
from mixer.redis_health import RedisHealth, read_through
from mixer.candidate_sources.base import source_limit


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
        neighbours_per_seed: neighbours read per seed (the index keeps 200: recall@200 of the
            source was 0.36 with 50, 0.45 with 200, 0.49 with every neighbour, on the validation days).
        timeout_ms: the runner's deadline for this source.

    Raises:
        ValueError: a count < 1.
    """

    def __init__(self, client: redis.Redis, max_candidates: int = 500, seed_posts: int = 32,
                 neighbours_per_seed: int = 200, timeout_ms: float = 50, name: str = "coengagement", *,
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

    def _read(self, posts: list[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return read_neighbours(self.client, posts, self.neighbours_per_seed)

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates with post_id and source_score, best first.

        Raises:
            redis.RedisError: Redis is unreachable (no cache).
            Fallback: Redis is unreachable; the candidates of the cached seeds.
        """
        sequence = query.action_sequence or ()  # None: unknown (Redis down): nothing to expand
        seeds = [a.post_id for a in sequence[: self.seed_posts]]
        if not seeds:
            return []
        lists, failed = read_through(self.cache, seeds, self._read, self.health)
        ids, total, _, _ = coengagement_scores([lists[s] for s in seeds if s in lists])
        keep = ~np.isin(ids, np.fromiter((a.post_id for a in sequence), dtype="int64"))
        ids, total = ids[keep], total[keep]
        order = np.lexsort((ids, -total))[: source_limit(self, query)]  # best first, ties by id
        out = [Candidate(post_id=int(pid), source=self.name, source_score=float(s))
               for pid, s in zip(ids[order], total[order])]
        if failed is not None:
            raise Fallback(out, f"Redis unavailable: {len(lists)} of {len(seeds)} seeds from the cache ({failed!r})")
        return out


def read_neighbours(client: redis.Redis, posts: list[int], n: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The top ``n`` co-engagement neighbours of each post, one pipeline of GETRANGEs of the packed
    lists (``core.online_layout.encode_neighbours``): post -> (ids int64, similarities float64),
    best first (empty arrays for a post without a list).

    Raises:
        ValueError: a list is not in the packed form (an index written by an older version, as
            zsets): the message says to rebuild the candidate index.
        redis.RedisError: Redis is unreachable.
    """
    width = keys.NEIGHBOUR_DTYPE.itemsize
    pipe = client.pipeline(transaction=False)
    for post in posts:
        pipe.getrange(keys.coengagement(post), 0, n * width - 1)
    try:
        raw = pipe.execute()
    except redis.ResponseError as e:
        if "WRONGTYPE" in str(e):
            raise ValueError(f"co-engagement lists ({keys.coengagement(posts[0])}, ...) are not packed strings: the "
                             "candidate index was written by an older version; rebuild it (`home-mixer index "
                             "build`)") from e
        raise
    return {post: keys.decode_neighbours(b) for post, b in zip(posts, raw)}
