"""Fills author_id, created_ts, tag_id and in_network from the index's post metadata hash."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.components import CandidateHydrator, Fallback
from mixer.redis_health import RedisHealth, guarded


class PostMetadataCandidateHydrator(CandidateHydrator):
    """One ``HMGET hm:post_meta`` for the distinct post ids of all candidates.

    Sets ``author_id``, ``created_ts`` (epoch s), ``tag_id`` (the post's primary tag: the first of
    its tags, which the index stores in the canonical table's order, so it equals the posts table's
    ``primary_tag``; -1 when the post has no tags) and ``in_network`` (author followed or engaged
    with). Candidates whose post is not in the index (deleted, or created after the index cutoff)
    are dropped, as Twitter drops candidates whose core data cannot be hydrated.

    With ``caches`` (the mixer's), each post's metadata (or its absence) is read once per
    candidate-index version (``MixerCaches.post_meta``) and only the uncached posts of a request
    are read (one HMGET). While Redis is down the cached posts are hydrated and the others dropped
    (``Fallback``: degraded).
    """

    name = "post_metadata"

    def __init__(self, client: redis.Redis, *, caches: MixerCaches | None = None, health: RedisHealth | None = None):
        self.client = client
        self.cache = caches.post_meta if caches is not None and caches.enabled else None
        self.health = health

    def _read(self, ids: list[int]) -> dict[int, tuple | None]:
        return read_post_meta(self.client, ids)

    def hydrate(self, query: Query, candidates: list[Candidate]) -> tuple[list[Candidate], int]:
        """Return ``(hydrated candidates in input order, number dropped for missing metadata)``.

        Raises:
            ValueError: a metadata value is malformed (the index needs a rebuild).
            redis.RedisError: Redis is unreachable (no cache).
            Fallback: Redis is unreachable; ``(the candidates of cached posts, dropped)``.
        """
        if not candidates:
            return [], 0
        ids = list(dict.fromkeys(c.post_id for c in candidates))
        cache, failed = self.cache, None
        if cache is None:
            meta = self._read(ids)
        else:
            version = cache.version
            meta, missing = cache.get_many(ids)
            if missing:
                try:
                    read = guarded(self.health, lambda: self._read(missing))
                    cache.put_many(read, version)
                    meta.update(read)
                except redis.RedisError as e:
                    failed = e
        kept, dropped = self._apply(query, candidates, meta)
        if failed is not None:
            raise Fallback((kept, dropped), f"Redis unavailable: {dropped} candidates without cached metadata "
                                            f"dropped ({failed!r})")
        return kept, dropped

    @staticmethod
    def _apply(query: Query, candidates: list[Candidate], meta: dict) -> tuple[list[Candidate], int]:
        in_network = query.in_network_authors
        kept = []
        for c in candidates:
            m = meta.get(c.post_id)
            if m is None:
                continue
            c.author_id, created, tags = m
            c.created_ts = float(created)
            c.tag_id = tags[0] if tags else -1
            c.in_network = c.author_id in in_network
            kept.append(c)
        return kept, len(candidates) - len(kept)


def read_post_meta(client: redis.Redis, ids: list[int]) -> dict[int, tuple | None]:
    """``hm:post_meta`` of ``ids`` in one HMGET: post -> ``(author_id, created_ts, tags)``
    (``core.online_layout.decode_post_meta``), None for a post the index does not hold.

    Raises:
        ValueError: a value is malformed (rebuild the index).
        redis.RedisError: Redis is unreachable.
    """
    values = client.hmget(keys.POST_META, ids)
    return {pid: None if v is None else keys.decode_post_meta(v) for pid, v in zip(ids, values)}
