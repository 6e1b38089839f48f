"""What the real-time features' writer and readers share: buckets, windows, decay, caps, names.

The stream processor (``pipelines.streaming.processor``, the writer, with its Lua scripts) and the
mixer's reader (``mixer.feature_hydrators.realtime_reader``) both follow these definitions; the keys
they use are in ``core.online_layout`` (``rt_*``). Times are epoch seconds UTC (float, microsecond
precision).

Window counts: per post and kind, a hash of 5-minute buckets (``{kind}:{bucket_start_s}`` ->
count); a window of ``W`` seconds ending at ``now`` sums the buckets of ``window_buckets(now, W)``.

Decayed score (Twitter's real-time aggregates idea: exponentially decayed counts with a half-life):
``score(now) = sum_i w_i * 2 ** (-(now - t_i) / HALF_LIFE_S)`` with ``w_i`` =
``schema.ENGAGEMENT_EDGE_WEIGHTS[kind]`` (0 for impressions and hate). It is stored as one value
``v`` at time ``t`` (the newest event time), so one update is O(1) and out-of-order events still
give the closed form (``decayed_add``).

Trending score per post and per tag (tags from the candidate index's post metadata): the same
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
from typing import Iterable, Mapping

from core.schema import ENGAGEMENT_EDGE_WEIGHTS, HEADS

# "impression" plus every engagement head, so a new head in schema.HEADS is accepted at once
# (the event schema's ``EngagementEvent.kind``, the kinds of the window counts).
ENGAGEMENT_KINDS: tuple[str, ...] = ("impression", *HEADS)

BUCKET_S = 300                    # 5-minute buckets
HALF_LIFE_S = 6 * 3600.0          # 6 h half-life of the decayed engagement score
RETENTION_S = 24 * 3600           # the longest window; older buckets are pruned
COUNTS_TTL_S = 26 * 3600          # counts / meta keys outlive the 24 h window by 2 h
SCORE_TTL_S = 7 * 24 * 3600       # after 7 days of silence a score has decayed by 2**-28
SEEN_TTL_S = 7 * 24 * 3600        # a redelivery later than this would be applied again
SEEN_HOUR_S = 3600                # engagement ids are marked applied in one set per event hour
RECENT_CAP = 50                   # last N engaged posts / authors per user
WINDOWS_S: dict[str, int] = {"5m": 300, "1h": 3600, "24h": 86400}
TRENDING_HALF_LIFE_S = 3600.0     # trending reacts within the hour (the 6 h score is the slower signal)
TRENDING_CAP = 10_000             # members kept per trending zset
MAX_TRENDING_EXPONENT = 1000.0    # log2 cap of a trending score read (a replay on another clock)
# Coverage (``rt_coverage`` in core.online_layout): an event more than this before the first one
# applied is a straggler, not the start of the stream (two buckets: well under the shortest merged
# window, 1 h, yet enough for two processors racing on their first batches).
OUT_OF_ORDER_S = 600


def kind_weight(kind: str) -> float:
    """Score weight of one event kind: ``ENGAGEMENT_EDGE_WEIGHTS`` (0 for impression and hate).

    Raises:
        ValueError: ``kind`` is not one of ``ENGAGEMENT_KINDS``.
    """
    if kind not in ENGAGEMENT_KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {list(ENGAGEMENT_KINDS)}")
    return float(ENGAGEMENT_EDGE_WEIGHTS.get(kind, 0.0))


def bucket_start(ts_s: float, bucket_s: int = BUCKET_S) -> int:
    """Start (epoch s, int) of the ``bucket_s``-second bucket holding ``ts_s`` (floor, also for negatives)."""
    if bucket_s < 1:
        raise ValueError(f"bucket_s must be >= 1, got {bucket_s}")
    return int(math.floor(ts_s / bucket_s)) * bucket_s


def seen_hour(ts_s: float) -> int:
    """Start (epoch s) of the hour whose idempotency set holds an engagement event of time ``ts_s``
    (``core.online_layout.rt_seen_set``)."""
    return bucket_start(ts_s, SEEN_HOUR_S)


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


def feature_name(kind: str, window: str) -> str:
    """``rt_{kind}s_{window}`` (``click``, ``5m`` -> ``rt_clicks_5m``)."""
    return f"rt_{kind}s_{window}"


def sum_window_counts(counts: Mapping[str, float], now_s: float, windows_s: Mapping[str, int] = WINDOWS_S,
                      kinds: Iterable[str] = ENGAGEMENT_KINDS, bucket_s: int = BUCKET_S) -> dict[str, float]:
    """Window sums from one post's bucket hash (the reader sums them in Redis; this is the reference).

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


def decay(value: float, from_s: float, to_s: float, half_life_s: float = HALF_LIFE_S) -> float:
    """``value * 2 ** (-(to_s - from_s) / half_life_s)`` (exponential decay with a half-life)."""
    if half_life_s <= 0:
        raise ValueError(f"half_life_s must be > 0, got {half_life_s}")
    return value * 2.0 ** (-(to_s - from_s) / half_life_s)


def decayed_add(value: float, t_s: float, weight: float, event_s: float,
                half_life_s: float = HALF_LIFE_S) -> tuple[float, float]:
    """Add one event of ``weight`` at ``event_s`` to a score ``value`` held at time ``t_s``.

    Returns ``(value', t')`` with ``t' = max(t_s, event_s)``; the result equals the closed form
    ``sum_i w_i 2**(-(t' - t_i)/half_life_s)`` whatever the arrival order. The writer's Lua
    (``pipelines/streaming/lua/engagement_batch.lua``) implements the same rule.
    """
    if event_s >= t_s:
        return decay(value, t_s, event_s, half_life_s) + weight, event_s
    return value + decay(weight, event_s, t_s, half_life_s), t_s


def trending_score(stored_log2: float, now_s: float, half_life_s: float = TRENDING_HALF_LIFE_S) -> float:
    """Trending score at ``now_s`` from the zset's stored ``log2`` forward-decayed sum:
    ``2 ** (stored - now_s / h)``, the exponent capped at ``MAX_TRENDING_EXPONENT`` (events stamped
    ahead of ``now_s``, a replay on another clock, would overflow; the order is what matters)."""
    return 2.0 ** min(stored_log2 - now_s / half_life_s, MAX_TRENDING_EXPONENT)
