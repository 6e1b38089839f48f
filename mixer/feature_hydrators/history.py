"""History features at request time: each candidate against the user action sequence."""

from __future__ import annotations

import numpy as np
import pandas as pd
import redis

from core.history_features import HISTORY_FEATURES, SEED_POSTS, SEQUENCE_ID_FEATURES, history_feature_columns
from core.id_features import sequence_bucket_rows
from mixer.caches import MixerCaches
from mixer.candidate import Candidate, Query
from mixer.candidate_hydrators.post_metadata import read_post_meta
from mixer.candidate_sources.coengagement import read_neighbours
from mixer.components import FeatureHydrator
from mixer.feature_hydrators.frame import set_feature_columns
from mixer.redis_health import RedisHealth, read_through

_EMPTY = (np.zeros(0, dtype="int64"), np.zeros(0, dtype="float64"))


class HistoryFeatureHydrator(FeatureHydrator):
    """Sets the ``core.history_features.HISTORY_FEATURES`` and ``SEQUENCE_ID_FEATURES`` columns of
    the frame from
    ``Query.action_sequence`` (newest first), the sequence posts' primary tags (``hm:post_meta``)
    and the co-engagement neighbour lists of the newest ``seed_posts`` (``hm:coeng:{post}``), with
    ``core.history_features.history_feature_columns``: the function the training sets use
    (``pipelines.history_features``), so the two cannot disagree.

    Reads go through the mixer's caches (post metadata and neighbour lists are shared by every
    request of an index build). When Redis fails, the stage is degraded and the history columns
    stay as the frame had them (NaN): the rankers score without history rather than not at all.

    Args:
        seed_posts: as ``candidate_sources.coengagement.seed_posts`` (the training sets' value).
        neighbours_per_seed: as ``candidate_sources.coengagement.neighbours_per_seed``.
        enabled: ``action_sequence.enabled`` (no sequence, nothing to compare with).
    """

    name = "history"
    stage = "history_features"

    def __init__(self, client: redis.Redis, seed_posts: int = SEED_POSTS, neighbours_per_seed: int = 200, *,
                 enabled: bool = True, caches: MixerCaches | None = None, health: RedisHealth | None = None):
        if seed_posts < 1 or neighbours_per_seed < 1:
            raise ValueError(f"seed_posts and neighbours_per_seed must be >= 1, got {seed_posts}, {neighbours_per_seed}")
        self.client = client
        self.seed_posts = seed_posts
        self.neighbours_per_seed = neighbours_per_seed
        self._enabled = enabled
        on = caches is not None and caches.enabled
        self.meta_cache = caches.post_meta if on else None
        self.neighbour_cache = caches.coengagement if on else None
        self.health = health

    def enabled(self, query: Query) -> bool:
        """The config switch."""
        return self._enabled

    def hydrate(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None) -> pd.DataFrame:
        """``features`` with the history columns set (row i = candidate i).

        Raises:
            redis.RedisError: a read failed (the runner keeps the frame as it was: degraded).
            RuntimeError: the query's sequence is unknown (``None``: its read failed); degraded too.
            ValueError: ``features`` is None or of another length than ``candidates``.
        """
        if features is None or len(features) != len(candidates):
            raise ValueError("the history hydrator refines the frame of the feature hydrator declared before it")
        seq = query.action_sequence
        if seq is None:  # the sequence could not be read: missing (NaN), not "no history" (zeros)
            raise RuntimeError("no user action sequence (its read failed): history features left missing")
        posts = [a.post_id for a in seq]
        seeds = posts[: self.seed_posts]
        meta, failed = read_through(self.meta_cache, posts, lambda ids: read_post_meta(self.client, ids),
                                     self.health) if posts else ({}, None)
        if failed is None and seeds:
            lists, failed = read_through(self.neighbour_cache, seeds,
                                         lambda ids: read_neighbours(self.client, ids, self.neighbours_per_seed),
                                         self.health)
        else:
            lists = {}
        if failed is not None:
            raise failed
        seq_tags = [(m[2][0] if m[2] else -1) if (m := meta.get(p)) is not None else -1 for p in posts]
        cols = history_feature_columns([a.author_id for a in seq], seq_tags, [lists.get(s, _EMPTY) for s in seeds],
                                       [c.post_id for c in candidates], [c.author_id for c in candidates],
                                       [c.tag_id for c in candidates])
        update = {name: cols[name] for name in HISTORY_FEATURES}
        # the sequence for the heavy ranker's target attention: the same row for every candidate
        seq_row = sequence_bucket_rows(posts, [a.author_id for a in seq])
        update.update(zip(SEQUENCE_ID_FEATURES, seq_row))
        return set_feature_columns(features, update)
