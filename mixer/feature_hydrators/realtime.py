"""Fresh post engagement counts from the stream processor, merged into the batch content features.

The batch view (``pipelines/features/content.py``) holds ``post_{kind}_{1h,24h}`` = events in
``[H - W, H)`` for the last materialised hour H, so it is up to an hour (plus the materialisation
delay) old. The stream processor keeps the same counts in 5-minute buckets
(``core/realtime.py``, read by ``realtime_reader.RealtimeFeatureReader``; at a bucket boundary its window equals the batch
definition, a test checks it). This hydrator replaces the batch values by the stream's window
ending at the request time, so an engagement counts for ranking as soon as it is written.

The stream only knows events since its coverage start T0 (``StreamCoverage.since``: about its
first applied event, out-of-order events up to 10 min before it included). For a window
``[s, c)`` (``c`` = request time rounded up to the 5-minute grid, ``s = c - W``) that starts
before T0, the part ``[s, T0)`` comes from the batch value, assumed uniform over its window:

    fresh_W = stream_W + batch_W * clip((T0 - s) / W, 0, 1)

(the sliding-window estimate of Cloudflare's rate limiter, "How we built rate limiting capable of
scaling to millions of domains", 2017). Once the stream has run for W, ``fresh_W = stream_W``. The
batch value is taken to describe the window ending at T0, which holds when the stream starts
where the batch data ends; with no stream data at all (no T0) nothing changes.

The 24 h smoothed rates ``post_click_rate_24h`` / ``post_long_view_rate_24h`` are recomputed from
the fresh counts with the batch job's own prior, recovered from the batch rows:
``rate = (k + p m) / (n + m)`` => ``p = (rate (n + m) - k) / m`` (median over the candidates,
since the prior is one global constant per head). 7-day and all-time features stay batch.

A stopped or overloaded processor would leave the stream's counts short of the truth (and, once
its coverage start is a window behind, replace the batch counts by them). The processor stamps
``caught_up``, the Redis server time before which its group applied every stream entry; when that
is more than ``max_staleness_s`` behind the Redis server's clock, ``fetch`` raises
``StaleStreamError`` and the pipeline keeps the batch values (degraded ``realtime_features``).
Liveness is judged on the Redis clock alone, not on the request time, which may be a pinned or
replayed clock (``clock`` in mixer.yaml).

A mixer without a stream processor is a mode, not a per-request degradation (``StreamLiveness``,
owned by the mixer process): until this process has seen a fresh ``caught_up`` stamp it runs
``batch_only`` (batch counts, nothing degraded, ``/healthz`` says so), whatever a processor that
ran before left in Redis; once it has seen one it runs ``realtime``, and a stamp going stale then
is a processor that stopped: degraded ``realtime_features`` until it is back (or the mixer
restarts). Without a ``StreamLiveness`` the hydrator expects a processor (stale = degraded).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import redis

from core.realtime import bucket_start
from core.schema import SMOOTHING_M
from mixer.candidate import Candidate, Query
from mixer.feature_hydrators.frame import set_feature_columns
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader, StreamCoverage

# batch feature -> stream kind (``events.ENGAGEMENT_KINDS``)
COUNT_KINDS: dict[str, str] = {"impressions": "impression", "clicks": "click", "long_views": "long_view",
                               "likes": "like"}
WINDOWS: dict[str, int] = {"1h": 3600, "24h": 86400}
CLOCK_SLACK_S = 5.0  # a liveness stamp this far ahead of the Redis clock is still believed
# smoothed 24 h rate -> its numerator count (denominator: post_impressions_24h)
RATES_24H: dict[str, str] = {"post_click_rate_24h": "post_clicks_24h",
                             "post_long_view_rate_24h": "post_long_views_24h"}


def merge_window(stream: np.ndarray, batch: np.ndarray, window_start_s: float, window_s: float,
                 coverage_since_s: float) -> np.ndarray:
    """``stream + batch * clip((T0 - window_start) / window, 0, 1)`` (module docstring); a NaN
    batch value (no batch row) counts as 0. Arrays are float64 of one length."""
    share = min(max((coverage_since_s - window_start_s) / window_s, 0.0), 1.0)
    return stream + np.nan_to_num(batch, nan=0.0) * share


def recover_prior(rate: np.ndarray, clicks: np.ndarray, impressions: np.ndarray,
                  m: float = SMOOTHING_M) -> float:
    """The prior ``p`` of ``rate = (k + p m) / (n + m)``, median over rows with all three values;
    NaN if there are none."""
    p = (rate * (impressions + m) - clicks) / m
    p = p[np.isfinite(p)]
    return float(np.median(p)) if len(p) else float("nan")


class StaleStreamError(RuntimeError):
    """The stream processors left an entry unapplied for longer than ``max_staleness_s`` (or never
    stamped, or stamped ahead of the Redis clock): their counts may be short."""


class StreamLiveness:
    """What one mixer process has seen of the stream processor (module docstring); thread-safe
    (attribute writes only). Shared by the pipeline declarations of the process (a model swap
    keeps it).

    Attributes:
        seen_live: a fresh ``caught_up`` stamp was seen since start (mode ``realtime``).
        last: the last coverage read (None before the first request / health check).
        fresh: whether that coverage was fresh.
    """

    def __init__(self):
        self.seen_live = False
        self.last: StreamCoverage | None = None
        self.fresh = False

    def observe(self, coverage: StreamCoverage, fresh: bool) -> None:
        """Record a coverage read and whether it was fresh."""
        self.last, self.fresh = coverage, fresh
        if fresh:
            self.seen_live = True

    @property
    def mode(self) -> str:
        """``"realtime"`` once a live processor was seen, else ``"batch_only"``."""
        return "realtime" if self.seen_live else "batch_only"

    def summary(self) -> dict:
        """``{"mode", "processor": "live" | "stopped" | "not_seen", "staleness_s"}`` (``/healthz``)."""
        stale = None if self.last is None else self.last.staleness_s
        state = "live" if self.fresh else "stopped" if self.seen_live else "not_seen"
        return {"mode": self.mode, "processor": state, "staleness_s": None if stale is None else round(stale, 3)}


@dataclass(frozen=True)
class FreshCounts:
    """What ``RealtimeFeatureHydrator.fetch`` read: coverage start T0 (epoch s, None = no stream
    data), the request time, and counts ``[candidates, COUNT_KINDS, WINDOWS]`` (float64)."""

    since: float | None
    now_s: float
    counts: np.ndarray


class RealtimeFeatureHydrator:
    """Overwrites the batch ``post_{impressions,clicks,long_views,likes}_{1h,24h}`` and the 24 h
    rates of a hydrated feature frame with counts fresh from the stream (module docstring).

    ``hydrate`` = ``fetch`` (one Redis script call, ~2 ms for 1000 posts) + ``merge``. Starting the
    fetch in parallel with the batch hydration measured no gain (bench/mixer_latency.py), so it
    runs after it.

    Args:
        client: Redis holding the stream processor's real-time keys (``core.online_layout``'s ``rt_*``).
        max_staleness_s: the stream counts are used only if the processors' group had applied
            every stream entry older than this many seconds (Redis server clock). A processor
            stamps every 0.1 s when busy and once a second when idle; a crashed one's entries are
            reclaimed after 30 s idle by a reclaim that runs every 30 s, so the default 120 s
            tolerates a crash or restart, not an outage.
        enabled: ``realtime.enabled``; False: the pipeline never calls it (no "realtime_features"
            timing). It is a ``mixer.components.FeatureHydrator`` (structurally).
        liveness: the mixer process's ``StreamLiveness`` (module docstring): before a live
            processor was seen, a stale or missing stamp means batch-only serving, not an error.
            None: a processor is expected.
        health: the mixer's ``mixer.redis_health.RedisHealth`` (fails fast while Redis is down).

    Raises:
        ValueError: ``max_staleness_s <= 0``.
    """

    name = "realtime"
    stage = "realtime_features"  # its timings_ms key and its ``degraded`` marker (mixer.components.FeatureHydrator)

    def __init__(self, client: redis.Redis, max_staleness_s: float = 120.0, enabled: bool = True,
                 liveness: StreamLiveness | None = None, health=None):
        if max_staleness_s <= 0:
            raise ValueError(f"max_staleness_s must be > 0, got {max_staleness_s}")
        self.reader = RealtimeFeatureReader(client)
        self.max_staleness_s = max_staleness_s
        self.is_enabled = bool(enabled)
        self.liveness = liveness
        self.health = health  # mixer.redis_health.RedisHealth: fail fast while Redis is down

    def is_fresh(self, coverage: StreamCoverage) -> bool:
        """The processors' ``caught_up`` stamp is within ``max_staleness_s`` of the Redis clock
        (and not more than ``CLOCK_SLACK_S`` ahead of it)."""
        stale = coverage.staleness_s
        return stale is not None and -CLOCK_SLACK_S <= stale <= self.max_staleness_s

    def enabled(self, query: Query) -> bool:
        """The configured switch ``realtime.enabled`` (the same for every query)."""
        return self.is_enabled

    def fetch(self, query: Query, candidates: list[Candidate]) -> FreshCounts:
        """Read the stream's coverage and the counts of the candidates' posts (two round trips).

        Raises:
            redis.RedisError: Redis is unreachable.
            StaleStreamError: the stream has data but its processors last caught up more than
                ``max_staleness_s`` ago (or never did).
        """
        if self.health is not None:
            self.health.check()
        coverage = self.reader.coverage()
        since, stale = coverage.since, coverage.staleness_s
        fresh = self.is_fresh(coverage)
        if self.liveness is not None:
            self.liveness.observe(coverage, fresh)
            if not self.liveness.seen_live:  # batch_only mode: no processor here (yet)
                return FreshCounts(None, query.now_s, np.zeros((len(candidates), len(COUNT_KINDS), len(WINDOWS))))
        # a stamp ahead of the Redis clock (stepped back, failover) proves nothing: stale too
        if not fresh and (since is not None or self.liveness is not None):  # (liveness: seen live, now stale)
            last = ("never" if stale is None else f"{stale:.1f} s ago" if stale >= 0
                    else f"{-stale:.1f} s ahead of the Redis clock")
            raise StaleStreamError(
                f"the stream processor last caught up {last} (limit {self.max_staleness_s:g} s); serving batch "
                "counts. Check that `home-mixer stream run` is up and its consumer lag "
                "(hm_stream_consumer_lag_entries)")
        if since is None or not candidates:
            return FreshCounts(since, query.now_s, np.zeros((len(candidates), len(COUNT_KINDS), len(WINDOWS))))
        posts = list(dict.fromkeys(c.post_id for c in candidates))
        counts = self.reader.post_window_matrix(posts, query.now_s, COUNT_KINDS.values(), WINDOWS)
        index = {p: i for i, p in enumerate(posts)}
        pos = np.fromiter((index[c.post_id] for c in candidates), dtype=np.int64, count=len(candidates))
        return FreshCounts(since, query.now_s, counts[pos])

    def merge(self, fresh: FreshCounts, features: pd.DataFrame) -> pd.DataFrame:
        """``features`` (float64, row i = candidate i, ``schema.ALL_FEATURES`` columns) with the
        fresh values, as a new frame; ``features`` itself when the stream has written nothing."""
        if fresh.since is None or not len(features):
            return features
        end = -bucket_start(-fresh.now_s)  # the windows end on the bucket grid (core.realtime.window_buckets)
        def batch(col: str) -> np.ndarray:
            return features[col].to_numpy(dtype="float64")

        n_batch = batch("post_impressions_24h")
        priors = {rate: recover_prior(batch(rate), batch(k), n_batch) for rate, k in RATES_24H.items()}
        update: dict[str, np.ndarray] = {}
        for j, (w, secs) in enumerate(WINDOWS.items()):
            for i, name in enumerate(COUNT_KINDS):
                col = f"post_{name}_{w}"
                update[col] = merge_window(fresh.counts[:, i, j], batch(col), end - secs, secs, fresh.since)
        n = update.get("post_impressions_24h", n_batch)
        for rate, k in RATES_24H.items():
            if np.isfinite(priors[rate]):
                update[rate] = (update.get(k, batch(k)) + priors[rate] * SMOOTHING_M) / (n + SMOOTHING_M)
        return set_feature_columns(features.copy(), update)

    def hydrate(self, query: Query, candidates: list[Candidate], features: pd.DataFrame) -> pd.DataFrame:
        """``merge(fetch(query, candidates), features)``; ``features`` is the batch frame (float64,
        row i = candidate i), so this hydrator is declared after the one that builds it.

        Raises:
            redis.RedisError: Redis is unreachable (the pipeline then keeps the batch values).
            StaleStreamError: the stream processors are behind (the pipeline keeps the batch values).
        """
        return self.merge(self.fetch(query, candidates), features)
