"""Reads the stream processor's real-time features for the mixer (the writer is
``pipelines.streaming.processor.StreamProcessor``).

Keys: ``core.online_layout`` (``rt_*``, ``RT_*``); buckets, windows, decay and trending math:
``core.realtime``. Window counts are summed inside Redis by ``lua/window_sums.lua``
(``WindowSumsScript``), one script call for any number of posts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import redis

from core import online_layout as keys
from core.lua import lua_source
from core.online_store import cluster_read, is_cluster
from core.realtime import ENGAGEMENT_KINDS, WINDOWS_S, decay, feature_name, trending_score, window_buckets


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


class WindowSumsScript:
    """``lua/window_sums.lua`` loaded on ``client``: per post, kind and window the summed bucket counts.

    Its KEYS are one counts hash per post (``rt_post_counts``) and its ARGV the number of windows,
    the ``(first, last)`` bucket starts per window and the kinds; this wrapper is the one place that
    lays them out. On a Redis Cluster the posts' hashes are in many slots, which a script may not
    span: their ``HGETALL``\ s go to the nodes owning them (``core.online_store.cluster_read``)
    and the same sums are made here.
    """

    def __init__(self, client: redis.Redis):
        self._client = client
        self._cluster = is_cluster(client)
        self._script = None if self._cluster else client.register_script(
            lua_source("mixer.feature_hydrators", "window_sums.lua"))

    def __call__(self, post_ids: list[int], bounds: list[tuple[int, int]], kinds: list[str]) -> np.ndarray:
        """float64 ``[posts, kinds, windows]`` for ``bounds`` = inclusive bucket-start ranges per window."""
        if self._cluster:
            return self._sums_here(post_ids, bounds, kinds)
        flat = self._script(keys=[keys.rt_post_counts(p) for p in post_ids],
                            args=[len(bounds), *(b for lo_hi in bounds for b in lo_hi), *kinds])
        return np.asarray(flat, dtype=np.float64).reshape(len(post_ids), len(kinds), len(bounds))

    def _sums_here(self, post_ids: list[int], bounds: list[tuple[int, int]], kinds: list[str]) -> np.ndarray:
        """``window_sums.lua``'s sums over the hashes read node by node (``cluster_read``)."""
        kind_of = {k: j for j, k in enumerate(kinds)}
        out = np.zeros((len(post_ids), len(kinds), len(bounds)), dtype=np.float64)
        replies = cluster_read(self._client, [("HGETALL", keys.rt_post_counts(p)) for p in post_ids])
        for i, counts in enumerate(replies):
            if isinstance(counts, list):  # a RESP2 reply as a plain pipeline leaves it: field, value, ...
                counts = dict(zip(counts[::2], counts[1::2]))
            for field, n in counts.items():
                kind, _, bucket = _s(field).rpartition(":")
                j = kind_of.get(kind)
                if j is None:
                    continue
                b = int(bucket)
                for w, (lo, hi) in enumerate(bounds):
                    if lo <= b <= hi:
                        out[i, j, w] += float(n)
        return out


@dataclass(frozen=True)
class StreamCoverage:
    """What the stream processor has covered (``online_layout.RT_COVERAGE``; epoch s, ``None`` =
    never written).

    Attributes:
        since: the earliest event time applied that is within 24 h of ``newest`` and at most
            ``core.realtime.OUT_OF_ORDER_S`` (10 min) before ``first``: the stream's window counts
            are complete for windows starting at or after it.
        newest: the newest event time applied (events more than ``BUCKET_S`` ahead of the
            processor's clock, from a skewed producer, move no coverage field).
        first: the time of the first event the stream applied.
        caught_up: Redis server time before which every entry of the stream was applied or
            dead-lettered by the processors' group (the processor's liveness stamp, from
            ``EventBus.applied_until``; entries trimmed before delivery excepted, see
            ``EventBus.skip_trimmed``); a stopped or overloaded processor stops advancing it.
        server_now: Redis server time when this was read (the clock ``caught_up`` is on).
    """

    since: float | None
    newest: float | None
    first: float | None
    caught_up: float | None
    server_now: float

    @property
    def staleness_s(self) -> float | None:
        """``server_now - caught_up`` (s): how long the stream's counts may have been short;
        ``None`` if the processor never stamped."""
        return None if self.caught_up is None else self.server_now - self.caught_up


class RealtimeFeatureReader:
    """Reads the processor's real-time features (one round trip per call).

    Args:
        client: a ``redis.Redis`` (bytes or decoded responses both work).
    """

    def __init__(self, client: redis.Redis):
        self.client = client
        self._window_sums = WindowSumsScript(client)

    def post_window_matrix(self, post_ids: Iterable[int], now_s: float, kinds: Iterable[str] = ENGAGEMENT_KINDS,
                           windows_s: Mapping[str, int] = WINDOWS_S) -> np.ndarray:
        """Window counts ending at ``now_s`` (``window_buckets``) as float64 ``[posts, kinds, windows]``
        in the given orders (0 for a post with no events), summed inside Redis by one script call.

        Raises:
            ValueError: a window is not a positive multiple of ``BUCKET_S``.
        """
        ids, kinds, windows = [int(p) for p in post_ids], list(kinds), list(windows_s.values())
        if not ids:
            return np.zeros((0, len(kinds), len(windows)))
        return self._window_sums(ids, [window_buckets(now_s, w) for w in windows], kinds)

    def post_window_counts(self, post_ids: Iterable[int], now_s: float,
                           windows_s: Mapping[str, int] = WINDOWS_S) -> dict[int, dict[str, float]]:
        """``{post_id: {"rt_{kind}s_{window}": count}}`` for every kind and window ending at ``now_s``
        (all 0.0 for a post with no events)."""
        ids = [int(p) for p in post_ids]
        m = self.post_window_matrix(ids, now_s, ENGAGEMENT_KINDS, windows_s)
        names = [[feature_name(k, w) for w in windows_s] for k in ENGAGEMENT_KINDS]
        return {p: {names[i][j]: float(m[n, i, j]) for i in range(len(names)) for j in range(len(names[i]))}
                for n, p in enumerate(ids)}

    def decayed_scores(self, ids: Iterable[int], now_s: float, entity: str = "post") -> dict[int, float]:
        """``{id: decayed engagement score at now_s}`` for ``entity`` ``"post"`` or ``"author"`` (0.0 if none).

        Raises:
            ValueError: unknown ``entity``.
        """
        # a post's score is in its counts hash (score_v, score_t), an author's in its own (v, t)
        layout = {"post": (keys.rt_post_counts, "score_v", "score_t"),
                  "author": (keys.rt_author_score, "v", "t")}.get(entity)
        if layout is None:
            raise ValueError(f"entity must be 'post' or 'author', got {entity!r}")
        key_of, v_field, t_field = layout
        ids = [int(i) for i in ids]
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(key_of(i), v_field, t_field)
        out = {}
        for i, (v, t) in zip(ids, pipe.execute()):
            out[i] = 0.0 if v is None else decay(float(v), float(t), now_s)
        return out

    def user_recent(self, user_id: int) -> tuple[list[int], list[int]]:
        """``(post_ids, author_ids)`` the user engaged with most recently, newest first (<= 50 each)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(keys.rt_user_recent_posts(user_id), 0, -1)
        pipe.zrevrange(keys.rt_user_recent_authors(user_id), 0, -1)
        posts, authors = pipe.execute()
        return [int(p) for p in posts], [int(a) for a in authors]

    def trending(self, now_s: float, k: int = 100, entity: str = "post") -> list[tuple[int, float]]:
        """The ``k`` top trending posts (``entity="post"``) or tags (``"tag"``) as ``[(id, score at
        now_s)]``, best first; score = decayed weighted engagements (1 h half-life,
        ``core.realtime.trending_score``).

        Raises:
            ValueError: unknown ``entity`` or ``k < 1``.
        """
        key = {"post": keys.RT_TRENDING_POSTS, "tag": keys.RT_TRENDING_TAGS}.get(entity)
        if key is None or k < 1:
            raise ValueError(f"need entity 'post' or 'tag' and k >= 1, got {entity!r}, {k}")
        rows = self.client.zrevrange(key, 0, k - 1, withscores=True)
        return [(int(m), trending_score(float(x), now_s)) for m, x in rows]

    def coverage(self) -> StreamCoverage:
        """What the stream covers (``RT_COVERAGE``) and the Redis server time, in one round trip;
        fields ``None`` before the first write."""
        client = self.client
        if is_cluster(client):
            # TIME has no key, so a cluster pipeline refuses it: ask the node holding RT_COVERAGE
            # both, still in one round trip
            client = client.get_redis_connection(client.get_node_from_key(keys.RT_COVERAGE))
        pipe = client.pipeline(transaction=False)
        pipe.hmget(keys.RT_COVERAGE, ["since", "newest", "first", "caught_up"])
        pipe.time()
        fields, (secs, micros) = pipe.execute()
        return StreamCoverage(*(None if v is None else float(v) for v in fields), server_now=secs + micros / 1e6)

    def coverage_since(self) -> float | None:
        """``coverage().since``: the earliest event time (epoch s) from which the stream's windows
        are complete; ``None`` before the first event."""
        return self.coverage().since

    def post_meta(self, post_id: int) -> dict[str, float]:
        """``{"last_event_ts": s, "last_write_ts": s}`` (empty if the post has no events)."""
        names = ("last_event_ts", "last_write_ts")
        values = self.client.hmget(keys.rt_post_counts(post_id), names)
        return {n: float(v) for n, v in zip(names, values) if v is not None}
