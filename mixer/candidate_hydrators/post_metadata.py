"""Fills author_id, created_ts, tag_id and in_network from the index's post metadata hash."""

from __future__ import annotations

import redis

from core import online_layout as keys
from mixer.candidate import Candidate, Query
from mixer.components import CandidateHydrator


class PostMetadataCandidateHydrator(CandidateHydrator):
    """One ``HMGET hm:post_meta`` for the distinct post ids of all candidates.

    Sets ``author_id``, ``created_ts`` (epoch s), ``tag_id`` (the post's primary tag: the first of
    its tags, which the index stores in the canonical table's order, so it equals the posts table's
    ``primary_tag``; -1 when the post has no tags) and ``in_network`` (author followed or engaged
    with). Candidates whose post is not in the index (deleted, or created after the index cutoff)
    are dropped, as Twitter drops candidates whose core data cannot be hydrated.
    """

    name = "post_metadata"

    def __init__(self, client: redis.Redis):
        self.client = client

    def hydrate(self, query: Query, candidates: list[Candidate]) -> tuple[list[Candidate], int]:
        """Return ``(hydrated candidates in input order, number dropped for missing metadata)``.

        Raises:
            ValueError: a metadata value is malformed (the index needs a rebuild).
        """
        if not candidates:
            return [], 0
        ids = list(dict.fromkeys(c.post_id for c in candidates))
        values = self.client.hmget(keys.POST_META, ids)
        meta = {pid: keys.decode_post_meta(v) for pid, v in zip(ids, values) if v is not None}
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
