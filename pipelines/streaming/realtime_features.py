"""Real-time engagement features in Redis: key names, window / decay math, and their reader.

Written by ``pipelines.streaming.processor.StreamProcessor`` from ``EngagementEvent`` /
``SocialGraphEvent``; read by ``RealtimeFeatureReader`` (for the mixer). Times are epoch seconds
UTC (float, microsecond precision); ids are decimal strings.

| key | type | content |
| --- | --- | --- |
| ``hm:rt:seen:{event_id}`` | string (TTL) | ``1``: the event was applied (idempotency) |
| ``hm:rt:post:{post_id}:counts`` | hash (TTL) | ``{kind}:{bucket_start_s}`` -> count in that 5-min bucket |
| ``hm:rt:post:{post_id}:meta`` | hash (TTL) | ``last_event_ts`` (newest event), ``last_write_ts`` |
| ``hm:rt:post:{post_id}:score`` | hash (TTL) | ``v`` decayed engagement score at time ``t`` |
| ``hm:rt:author:{author_id}:score`` | hash (TTL) | same, summed over the author's posts |
| ``hm:rt:user:{user_id}:posts`` / ``:authors`` | zset | last 50 positively engaged post / author -> event ts |
| ``hm:rt:social_ts:{user_id}`` | hash | ``{family}:{author_id}`` -> ts of the last applied social action |
| ``hm:follows:{user_id}``, ``hm:hated_authors:{user_id}`` | set | the mixer's keys (``core/online_layout.py``) |
| ``hm:blocked_authors:{user_id}``, ``hm:muted_authors:{user_id}`` | set | authors the user blocked / muted |
| ``hm:rt:trending:posts`` / ``hm:rt:trending:tags`` | zset | post / tag -> log2 forward-decayed score (below) |
| ``hm:rt:coverage`` | hash | ``newest``, ``first`` and ``since`` event times (``StreamCoverage``); ``caught_up``: Redis server time before which the group applied every entry (liveness) |

Decayed score (Twitter's real-time aggregates idea: exponentially decayed counts with a half-life):
``score(now) = sum_i w_i * 2 ** (-(now - t_i) / HALF_LIFE_S)`` with ``w_i`` =
``schema.ENGAGEMENT_EDGE_WEIGHTS[kind]`` (0 for impressions and hate). It is stored as one value
``v`` at time ``t`` (the newest event time), so one update is O(1) and out-of-order events still
give the closed form.

Trending score per post and per tag (tags from the candidate index's ``hm:post_meta``): the same
decayed sum with a 1 h half-life, kept by *forward decay* (Cormode, Shkapenyuk, Srivastava, Xu,
"Forward Decay: A Practical Time Decay Model for Streaming Systems", ICDE 2009): each event adds
``w * 2 ** (t_i / h)``, a static weight, so the ranking by the stored sum is the ranking by decayed
score at any common time and one ZSET serves "top trending now" without rescoring. The zset holds
``log2`` of the sum (summed by log-sum-exp; ``t_i / h`` is ~4.6e5 today, far inside a double), and
``score(now) = 2 ** (stored - now / h)``. It keeps the ``TRENDING_CAP`` highest members; a member
trimmed and seen again restarts from its new events.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np
import redis

from core.schema import ENGAGEMENT_EDGE_WEIGHTS
from core import online_layout as keys
from pipelines.streaming.events import ENGAGEMENT_KINDS

BUCKET_S = 300                    # 5-minute buckets
HALF_LIFE_S = 6 * 3600.0          # 6 h half-life of the decayed engagement score
RETENTION_S = 24 * 3600           # the longest window; older buckets are pruned
COUNTS_TTL_S = 26 * 3600          # counts / meta keys outlive the 24 h window by 2 h
SCORE_TTL_S = 7 * 24 * 3600       # after 7 days of silence a score has decayed by 2**-28
SEEN_TTL_S = 7 * 24 * 3600        # a redelivery later than this would be applied again
RECENT_CAP = 50                   # last N engaged posts / authors per user
WINDOWS_S: dict[str, int] = {"5m": 300, "1h": 3600, "24h": 86400}
TRENDING_HALF_LIFE_S = 3600.0     # trending reacts within the hour (the 6 h score is the slower signal)
TRENDING_CAP = 10_000             # members kept per trending zset
MAX_TRENDING_EXPONENT = 1000.0    # log2 cap of a trending score read (see trending())
# Coverage (StreamCoverage): an event more than this before the first one applied is a straggler,
# not the start of the stream (two buckets: well under the shortest merged window, 1 h, yet enough
# for two processors racing on their first batches).
OUT_OF_ORDER_S = 600
TRENDING_POSTS_KEY = "hm:rt:trending:posts"
TRENDING_TAGS_KEY = "hm:rt:trending:tags"
COVERAGE_KEY = "hm:rt:coverage"
POST_META_KEY = keys.POST_META  # read for a post's tags


def seen_key(event_id: str) -> str:
    """Idempotency marker of one event."""
    return f"hm:rt:seen:{event_id}"


def post_counts_key(post_id: int) -> str:
    """hash ``{kind}:{bucket_start_s}`` -> count."""
    return f"hm:rt:post:{post_id}:counts"


def post_meta_key(post_id: int) -> str:
    """hash ``last_event_ts``, ``last_write_ts`` (epoch s)."""
    return f"hm:rt:post:{post_id}:meta"


def post_score_key(post_id: int) -> str:
    """hash ``v`` (decayed score at ``t``), ``t`` (epoch s)."""
    return f"hm:rt:post:{post_id}:score"


def author_score_key(author_id: int) -> str:
    """hash ``v``, ``t`` like ``post_score_key``, over all of the author's posts."""
    return f"hm:rt:author:{author_id}:score"


def user_recent_posts_key(user_id: int) -> str:
    """zset post_id -> newest positive engagement ts, capped at ``RECENT_CAP``."""
    return f"hm:rt:user:{user_id}:posts"


def user_recent_authors_key(user_id: int) -> str:
    """zset author_id -> newest positive engagement ts, capped at ``RECENT_CAP``."""
    return f"hm:rt:user:{user_id}:authors"


def social_ts_key(user_id: int) -> str:
    """hash ``{follow|block|mute}:{author_id}`` -> ts of the last applied action (drops stale events)."""
    return f"hm:rt:social_ts:{user_id}"


def blocked_authors_key(user_id: int) -> str:
    """The mixer's blocked-author set (``core.online_layout.blocked_authors``)."""
    return keys.blocked_authors(user_id)


def muted_authors_key(user_id: int) -> str:
    """The mixer's muted-author set (``core.online_layout.muted_authors``)."""
    return keys.muted_authors(user_id)


def follows_key(user_id: int) -> str:
    """The mixer's follow set (``core.online_layout.follows``)."""
    return keys.follows(user_id)


def hated_authors_key(user_id: int) -> str:
    """The mixer's hated-author set (``core.online_layout.hated_authors``)."""
    return keys.hated_authors(user_id)


def kind_weight(kind: str) -> float:
    """Score weight of one event kind: ``ENGAGEMENT_EDGE_WEIGHTS`` (0 for impression and hate).

    Raises:
        ValueError: ``kind`` is not one of ``events.ENGAGEMENT_KINDS``.
    """
    if kind not in ENGAGEMENT_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(ENGAGEMENT_KINDS)}")
    return float(ENGAGEMENT_EDGE_WEIGHTS.get(kind, 0.0))


def bucket_start(ts_s: float, bucket_s: int = BUCKET_S) -> int:
    """Start (epoch s, int) of the ``bucket_s``-second bucket holding ``ts_s`` (floor, also for negatives)."""
    if bucket_s < 1:
        raise ValueError(f"bucket_s must be >= 1, got {bucket_s}")
    return int(math.floor(ts_s / bucket_s)) * bucket_s


def window_buckets(now_s: float, window_s: int, bucket_s: int = BUCKET_S) -> tuple[int, int]:
    """Inclusive range ``(first, last)`` of bucket starts a window of ``window_s`` ending at ``now_s`` sums.

    With ``c = ceil(now_s / bucket_s) * bucket_s`` the window is the buckets of ``[c - window_s, c)``:
    at a bucket boundary (``now_s = c``) exactly the events in ``[now_s - window_s, now_s)``, the
    batch definition of ``pipelines.features.content`` (so an hourly batch row stamped H equals the
    stream's window at H); between boundaries it includes the current, partial bucket, so an event
    counts from the moment it is written.

    Raises:
        ValueError: ``window_s`` is not a positive multiple of ``bucket_s``.
    """
    if window_s < bucket_s or window_s % bucket_s:
        raise ValueError(f"window_s={window_s} must be a positive multiple of bucket_s={bucket_s}")
    end = -bucket_start(-now_s, bucket_s)  # ceil to the bucket grid
    return end - window_s, end - bucket_s


def sum_window_counts(counts: Mapping[str, float], now_s: float, windows_s: Mapping[str, int] = WINDOWS_S,
                      kinds: Iterable[str] = ENGAGEMENT_KINDS, bucket_s: int = BUCKET_S) -> dict[str, float]:
    """Window sums from one post's bucket hash.

    Args:
        counts: ``{"{kind}:{bucket_start}": count}`` (str keys, as ``HGETALL`` decoded).
        now_s: the reference time (epoch s).
    Returns:
        ``{"rt_{kind}s_{window}": float}`` for every kind and window (0.0 when empty), e.g.
        ``rt_clicks_5m``, ``rt_impressions_1h``, ``rt_long_views_24h``.
    Raises:
        ValueError: a field is not ``kind:int``.
    """
    ranges = {w: window_buckets(now_s, s, bucket_s) for w, s in windows_s.items()}
    out = {feature_name(k, w): 0.0 for k in kinds for w in windows_s}
    for field, value in counts.items():
        kind, sep, b = field.rpartition(":")
        if not sep:
            raise ValueError(f"bad counts field {field!r}: expected 'kind:bucket_start'")
        b = int(b)
        for w, (lo, hi) in ranges.items():
            name = feature_name(kind, w)
            if lo <= b <= hi and name in out:
                out[name] += float(value)
    return out


def feature_name(kind: str, window: str) -> str:
    """``rt_{kind}s_{window}`` (``click``, ``5m`` -> ``rt_clicks_5m``)."""
    return f"rt_{kind}s_{window}"


def decay(value: float, from_s: float, to_s: float, half_life_s: float = HALF_LIFE_S) -> float:
    """``value * 2 ** (-(to_s - from_s) / half_life_s)`` (exponential decay with a half-life)."""
    if half_life_s <= 0:
        raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
    return value * 2.0 ** (-(to_s - from_s) / half_life_s)


def decayed_add(value: float, t_s: float, weight: float, event_s: float,
                half_life_s: float = HALF_LIFE_S) -> tuple[float, float]:
    """Add one event of ``weight`` at ``event_s`` to a score ``value`` held at time ``t_s``.

    Returns ``(value', t')`` with ``t' = max(t_s, event_s)``; the result equals the closed form
    ``sum_i w_i 2**(-(t' - t_i)/half_life_s)`` whatever the arrival order. The Lua writer in
    ``processor.py`` implements the same rule.
    """
    if event_s >= t_s:
        return decay(value, t_s, event_s, half_life_s) + weight, event_s
    return value + decay(weight, event_s, t_s, half_life_s), t_s


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


# Window sums computed in Redis: KEYS = counts hashes; ARGV = n windows, then (first, last) bucket
# start per window, then the kinds. Returns per key, per kind, per window the count (flat, ints).
# Read-only; it runs for O(fields of the keys), e.g. ~1 ms for 1000 posts of the demo's replay.
_WINDOW_SUMS_LUA = r"""
local nw = tonumber(ARGV[1])
local lo, hi = {}, {}
for w = 1, nw do lo[w] = tonumber(ARGV[2 * w]); hi[w] = tonumber(ARGV[2 * w + 1]) end
local kinds, nk = {}, 0
for i = 2 * nw + 2, #ARGV do nk = nk + 1; kinds[ARGV[i]] = nk end
local out = {}
for j = 1, #KEYS * nk * nw do out[j] = 0 end
for p = 1, #KEYS do
  local base = (p - 1) * nk * nw
  local f = redis.call('HGETALL', KEYS[p])
  for i = 1, #f, 2 do
    local kind, b = string.match(f[i], '^(.*):(%-?%d+)$')
    local k = kinds[kind]
    if k then
      b = tonumber(b)
      for w = 1, nw do
        if b >= lo[w] and b <= hi[w] then
          local idx = base + (k - 1) * nw + w
          out[idx] = out[idx] + tonumber(f[i + 1])
        end
      end
    end
  end
end
return out
"""


@dataclass(frozen=True)
class StreamCoverage:
    """What the stream processor has covered (epoch s; ``None`` = never written).

    Attributes:
        since: the earliest event time applied that is within 24 h of ``newest`` and at most
            ``OUT_OF_ORDER_S`` (10 min) before ``first``: the stream's window counts are complete for
            windows starting at or after it.
        newest: the newest event time applied (events more than ``BUCKET_S`` ahead of the
            processor's clock, from a skewed producer, move no coverage field).
        first: the time of the first event the stream applied.
        caught_up: Redis server time before which every entry of the stream was applied or
            dead-lettered by the processors' group (``processor._STAMP_LUA``; entries trimmed
            before delivery excepted, see ``EventBus.skip_trimmed``); a stopped or overloaded
            processor stops advancing it.
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
        self._window_sums = client.register_script(_WINDOW_SUMS_LUA)

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
        bounds = [b for w in windows for b in window_buckets(now_s, w)]
        flat = self._window_sums(keys=[post_counts_key(p) for p in ids], args=[len(windows), *bounds, *kinds])
        return np.asarray(flat, dtype=np.float64).reshape(len(ids), len(kinds), len(windows))

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
        key_of = {"post": post_score_key, "author": author_score_key}.get(entity)
        if key_of is None:
            raise ValueError(f"entity must be 'post' or 'author', got {entity!r}")
        ids = [int(i) for i in ids]
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hmget(key_of(i), "v", "t")
        out = {}
        for i, (v, t) in zip(ids, pipe.execute()):
            out[i] = 0.0 if v is None else decay(float(v), float(t), now_s)
        return out

    def user_recent(self, user_id: int) -> tuple[list[int], list[int]]:
        """``(post_ids, author_ids)`` the user engaged with most recently, newest first (<= 50 each)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zrevrange(user_recent_posts_key(user_id), 0, -1)
        pipe.zrevrange(user_recent_authors_key(user_id), 0, -1)
        posts, authors = pipe.execute()
        return [int(p) for p in posts], [int(a) for a in authors]

    def trending(self, now_s: float, k: int = 100, entity: str = "post") -> list[tuple[int, float]]:
        """The ``k`` top trending posts (``entity="post"``) or tags (``"tag"``) as ``[(id, score at
        now_s)]``, best first; score = decayed weighted engagements (1 h half-life).

        Raises:
            ValueError: unknown ``entity`` or ``k < 1``.
        """
        key = {"post": TRENDING_POSTS_KEY, "tag": TRENDING_TAGS_KEY}.get(entity)
        if key is None or k < 1:
            raise ValueError(f"need entity 'post' or 'tag' and k >= 1, got {entity!r}, {k}")
        rows = self.client.zrevrange(key, 0, k - 1, withscores=True)
        # Events stamped ahead of now_s (a replay on another clock) would overflow 2 ** x; the
        # order is what matters, so the exponent is capped (2 ** 1000 ~ 1e301 stays finite).
        return [(int(m), 2.0 ** min(float(x) - now_s / TRENDING_HALF_LIFE_S, MAX_TRENDING_EXPONENT))
                for m, x in rows]

    def coverage(self) -> StreamCoverage:
        """What the stream covers (``hm:rt:coverage``) and the Redis server time, in one round trip;
        fields ``None`` before the first write."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(COVERAGE_KEY, ["since", "newest", "first", "caught_up"])
        pipe.time()
        fields, (secs, micros) = pipe.execute()
        return StreamCoverage(*(None if v is None else float(v) for v in fields), server_now=secs + micros / 1e6)

    def coverage_since(self) -> float | None:
        """``coverage().since``: the earliest event time (epoch s) from which the stream's windows
        are complete; ``None`` before the first event."""
        return self.coverage().since

    def post_meta(self, post_id: int) -> dict[str, float]:
        """``{"last_event_ts": s, "last_write_ts": s}`` (empty if the post has no events)."""
        return {_s(k): float(v) for k, v in self.client.hgetall(post_meta_key(post_id)).items()}
