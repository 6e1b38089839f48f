"""The home-timeline pipeline, declared top to bottom in one place.

    query hydration      UserContextQueryHydrator (Redis), ExperimentArmQueryHydrator (hash)
    candidate sources    InNetwork, TagInterest, Trending, Popular - in parallel, per-source timeout,
                         fail-open
    candidate hydration  PostMetadataCandidateHydrator (author, created time, in-network)
    filters              PreviouslySeen -> HatedAuthor -> BlockedMutedAuthor -> MaxAge -> Duplicate
                         (cheapest first)
    feature hydration    FeastLayoutFeatureHydrator (or FeastSdkFeatureHydrator) + request features,
                         then RealtimeFeatureHydrator (fresh post counts from the stream processor)
    light ranker         LightRankerScorer over all candidates
    top K                TopKSelector (heavy_ranker_top_k by light score)
    heavy ranker         HeavyRankerScorer: one probability per head
    blender              WeightedSumBlender with the arm's weights
    selectors            AuthorDiversitySelector (decay + cap per author), PageSelector (+ cursor)
    side effects         ServedPostsSideEffect, ImpressionLogSideEffect, RequestMetricsSideEffect

Filters run on core data (author, creation time) before feature hydration so filtered posts cost
no feature reads, as product-mixer runs filters before its feature hydrators. Each stage's wall
time is recorded in ``TimelineResult.timings_ms``.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis

from mixer.blenders import WeightedSumBlender
from mixer.candidate import Candidate, Query
from mixer.candidate_hydrators import PostMetadataCandidateHydrator
from mixer.candidate_sources import (
    CandidateSource,
    InNetworkCandidateSource,
    ParallelSourceRunner,
    PopularCandidateSource,
    SourceResult,
    TagInterestCandidateSource,
    TrendingCandidateSource,
)
from mixer.config import MixerConfig
from mixer.feature_hydrators.frame import empty_feature_frame
from mixer.feature_hydrators.realtime import RealtimeFeatureHydrator
from mixer.filters import (
    BlockedMutedAuthorFilter,
    DuplicateFilter,
    HatedAuthorFilter,
    MaxAgeFilter,
    PreviouslySeenFilter,
)
from mixer.metrics import MixerMetrics
from mixer.query_hydrators import ExperimentArmQueryHydrator, UserContextQueryHydrator
from mixer.scorers import HeavyRankerScorer, LightRankerScorer, RankerHandle
from mixer.selectors import AuthorDiversitySelector, PageCursor, PageSelector, TopKSelector
from mixer.side_effects import ImpressionLogSideEffect, RequestMetricsSideEffect, ServedPostsSideEffect

log = logging.getLogger(__name__)


@dataclass
class TimelineResult:
    """What one request produced.

    Attributes:
        query: the hydrated query (user context, arm).
        items: the page, best first (``score`` descending).
        next_cursor: cursor of the next page, or None when the ranked list is exhausted.
        timings_ms: stage name -> wall milliseconds, plus "total".
        source_results: one per candidate source (status, count, elapsed).
        filtered: filter name -> candidates it removed.
        counts: retrieved, hydrated, after_filters, heavy_ranked, selected.
        model_versions: {"light_ranker": version, "heavy_ranker": version}.
        degraded: stages that failed open (e.g. "feature_hydration" served with NaN features,
            "realtime_features" served with the batch values).
        scoring_paths: {"light_ranker": path, "heavy_ranker": path}, path one of "in_process",
            a remote backend ("triton_grpc", "triton_http", "bentoml") or "in_process_fallback".
    """

    query: Query
    items: list[Candidate]
    next_cursor: PageCursor | None
    timings_ms: dict[str, float]
    source_results: list[SourceResult]
    filtered: dict[str, int]
    counts: dict[str, int]
    model_versions: dict[str, str]
    degraded: list[str] = field(default_factory=list)
    scoring_paths: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RankerSet:
    """The scorers in use, swapped as one object so a request never mixes model versions."""

    light: LightRankerScorer
    heavy: HeavyRankerScorer

    @property
    def model_versions(self) -> dict[str, str]:
        return {"light_ranker": self.light.version, "heavy_ranker": self.heavy.version}


class _StageClock:
    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round((now - self.last) * 1000.0, 3)
        self.last = now

    def total(self) -> None:
        self.timings["total"] = round((time.perf_counter() - self.start) * 1000.0, 3)


class HomeTimelinePipeline:
    """One home-timeline request from user id to ranked page (see the module docstring for the stages).

    Build it with ``build_pipeline``; call ``run``. Thread-safe (no per-request state on self).
    """

    def __init__(self, *, config: MixerConfig, query_hydrators, source_runner: ParallelSourceRunner,
                 candidate_hydrator, filters, feature_hydrator, light_ranker: LightRankerScorer,
                 realtime_hydrator: RealtimeFeatureHydrator | None = None,
                 top_k: TopKSelector, heavy_ranker: HeavyRankerScorer, blender: WeightedSumBlender,
                 author_diversity: AuthorDiversitySelector, page: PageSelector, side_effects,
                 metrics_side_effect: RequestMetricsSideEffect, metrics: MixerMetrics):
        self.config = config
        self.query_hydrators = list(query_hydrators)
        self.source_runner = source_runner
        self.candidate_hydrator = candidate_hydrator
        self.filters = list(filters)
        self.feature_hydrator = feature_hydrator
        self.realtime_hydrator = realtime_hydrator
        self.rankers = RankerSet(light_ranker, heavy_ranker)
        self.top_k = top_k
        self.blender = blender
        self.author_diversity = author_diversity
        self.page = page
        self.side_effects = list(side_effects)
        self.metrics_side_effect = metrics_side_effect
        self.metrics = metrics

    @property
    def model_versions(self) -> dict[str, str]:
        return self.rankers.model_versions

    def swap_rankers(self, light: RankerHandle, heavy: RankerHandle) -> None:
        """Serve new model versions from the next request on (in-flight requests finish on the old).

        Raises:
            ValueError: the new heavy ranker has other heads than the blender's (a restart with a
                matching config is needed), or a model needs features the mixer cannot hydrate.
        """
        new = RankerSet(LightRankerScorer(light), HeavyRankerScorer(heavy))
        if list(new.heavy.heads) != list(self.rankers.heavy.heads):
            raise ValueError(f"heavy ranker v{heavy.version} has heads {list(new.heavy.heads)}, "
                             f"the running blender expects {list(self.rankers.heavy.heads)}")
        self.rankers = new  # one attribute assignment: atomic for readers
        self.metrics.set_model_versions(new.model_versions)

    def run(self, user_id: int, page_size: int | None = None, cursor: PageCursor | None = None) -> TimelineResult:
        """Rank one page of ``user_id``'s home timeline.

        Args:
            user_id: the viewer (unknown users get a cold-start timeline of popular posts).
            page_size: posts per page, 1..page.max_size (default page.default_size).
            cursor: the previous page's cursor (None for the first page).

        Raises:
            ValueError: page_size out of range.
            redis.RedisError: Redis is unreachable during query hydration or candidate hydration.
        """
        cfg = self.config
        size = cfg.page.default_size if page_size is None else int(page_size)
        if not 1 <= size <= cfg.page.max_size:
            raise ValueError(f"page size must be between 1 and {cfg.page.max_size}, got {size}")
        cursor = cursor or PageCursor(0, ())
        clock = _StageClock()
        degraded: list[str] = []

        # 1. query hydration
        query = Query(user_id=int(user_id), page_size=size, now_s=cfg.clock.now_s(),
                      request_id=uuid.uuid4().hex, excluded_posts=frozenset(cursor.served),
                      page_index=cursor.page_index)
        for hydrator in self.query_hydrators:
            query = hydrator.hydrate(query)
        clock.lap("query_hydration")

        # 2. candidate sources (parallel, fail-open)
        candidates, source_results = self.source_runner.run(query)
        retrieved = len(candidates)
        clock.lap("candidate_sources")

        # 3. candidate hydration (core data)
        candidates, _missing = self.candidate_hydrator.hydrate(query, candidates)
        hydrated = len(candidates)
        clock.lap("candidate_hydration")

        # 4. filters, cheapest first
        filtered: dict[str, int] = {}
        for f in self.filters:
            before = len(candidates)
            candidates = f.apply(query, candidates)
            filtered[f.name] = before - len(candidates)
        after_filters = len(candidates)
        clock.lap("filters")

        # 5. feature hydration (fail-open: NaN features rather than no timeline)
        try:
            features = self.feature_hydrator.hydrate(query, candidates)
        except Exception as e:  # noqa: BLE001
            log.warning("feature hydration failed for user %s: %r; ranking with missing features", user_id, e)
            degraded.append("feature_hydration")
            features = empty_feature_frame().reindex(range(len(candidates)))
        clock.lap("feature_hydration")
        if self.realtime_hydrator is not None:
            try:
                features = self.realtime_hydrator.hydrate(query, candidates, features)
            except Exception as e:  # noqa: BLE001
                log.warning("real-time features failed for user %s: %r; ranking with batch values", user_id, e)
                degraded.append("realtime_features")
            clock.lap("realtime_features")

        # 6. light ranker on all, keep top K, heavy ranker on those
        rankers = self.rankers  # one snapshot per request: versions cannot change mid-request
        paths = {"light_ranker": rankers.light.score(candidates, features)}
        clock.lap("light_ranker")
        candidates, features = self.top_k.select(candidates, features)
        paths["heavy_ranker"] = rankers.heavy.score(candidates, features)
        clock.lap("heavy_ranker")
        for model, path in paths.items():
            if path is not None:
                self.metrics.scoring.labels(model=model, path=path).inc()

        # 7. blender
        self.blender.blend(query, candidates)
        clock.lap("blender")

        # 8. selectors
        ranked = self.author_diversity.select(candidates)
        items, next_cursor = self.page.select(ranked, size, cursor)
        clock.lap("selectors")

        result = TimelineResult(
            query=query, items=items, next_cursor=next_cursor, timings_ms=clock.timings,
            source_results=source_results, filtered=filtered,
            counts={"retrieved": retrieved, "hydrated": hydrated, "after_filters": after_filters,
                    "heavy_ranked": len(candidates), "selected": len(items)},
            model_versions=rankers.model_versions, degraded=degraded,
            scoring_paths={k: v for k, v in paths.items() if v is not None},
        )

        # 9. side effects (fail-open)
        for effect in self.side_effects:
            try:
                effect.apply(result)
            except Exception as e:  # noqa: BLE001
                log.warning("side effect %s failed for user %s: %r", effect.name, user_id, e)
                self.metrics.side_effect_failures.labels(side_effect=effect.name).inc()
        clock.lap("side_effects")
        clock.total()
        self.metrics_side_effect.apply(result)
        return result


def build_pipeline(config: MixerConfig, *, client: redis.Redis, light: RankerHandle, heavy: RankerHandle,
                   feature_hydrator, executor: ThreadPoolExecutor, metrics: MixerMetrics) -> HomeTimelinePipeline:
    """Assemble the pipeline from the config and already-opened resources.

    Args:
        client: Redis with the candidate index (and served records).
        light, heavy: loaded rankers (``models.registry.load_ranker``).
        feature_hydrator: ``FeastLayoutFeatureHydrator`` or ``FeastSdkFeatureHydrator``.
        executor: thread pool for candidate sources (caller shuts it down).
        metrics: where the pipeline records metrics.

    Raises:
        ValueError: the models do not fit the config (unknown features, arm weights of missing heads).
    """
    src = config.candidate_sources
    # priority order: the most personalised source names a post returned by several
    sources: list[CandidateSource] = [
        InNetworkCandidateSource(client, src.in_network.max_candidates, src.in_network.max_authors,
                                 src.in_network.posts_per_author, src.in_network.timeout_ms),
        TagInterestCandidateSource(client, src.tag_interest.max_candidates, src.tag_interest.top_tags,
                                   src.tag_interest.timeout_ms),
        PopularCandidateSource(client, src.popular.max_candidates, src.popular.window, src.popular.timeout_ms),
    ]
    if src.trending.enabled:  # before popular: a post both trending and popular is named trending
        sources.insert(2, TrendingCandidateSource(client, src.trending.max_candidates, src.trending.timeout_ms))
    heavy_scorer = HeavyRankerScorer(heavy)
    pipeline = HomeTimelinePipeline(
        config=config,
        query_hydrators=[UserContextQueryHydrator(client, config.served.ttl_seconds),
                         ExperimentArmQueryHydrator(config.experiment)],
        source_runner=ParallelSourceRunner(sources, executor),
        candidate_hydrator=PostMetadataCandidateHydrator(client),
        filters=[PreviouslySeenFilter(), HatedAuthorFilter(), BlockedMutedAuthorFilter(),
                 MaxAgeFilter(config.filters.max_post_age_days), DuplicateFilter()],
        feature_hydrator=feature_hydrator,
        realtime_hydrator=(RealtimeFeatureHydrator(client, config.realtime.max_staleness_s)
                           if config.realtime.enabled else None),
        light_ranker=LightRankerScorer(light),
        top_k=TopKSelector(config.ranking.heavy_ranker_top_k),
        heavy_ranker=heavy_scorer,
        blender=WeightedSumBlender({a.name: a.weights for a in config.experiment.arms}, heavy_scorer.heads),
        author_diversity=AuthorDiversitySelector(config.filters.max_posts_per_author,
                                                 config.ranking.author_diversity_decay,
                                                 config.ranking.author_diversity_floor),
        page=PageSelector(),
        side_effects=[ServedPostsSideEffect(client, config.served.ttl_seconds, config.served.max_per_user),
                      ImpressionLogSideEffect(client, config.served.impression_stream_maxlen)],
        metrics_side_effect=RequestMetricsSideEffect(metrics),
        metrics=metrics,
    )
    metrics.set_model_versions(pipeline.model_versions)
    return pipeline


def finite(x: float) -> float | None:
    """``x`` for JSON, or None if NaN/inf (JSON has no NaN)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


__all__ = ["HomeTimelinePipeline", "TimelineResult", "build_pipeline", "finite"]
