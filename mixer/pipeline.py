"""The home-timeline pipeline: its one declaration (``home_timeline``), read top to bottom, and
the request entry point around it (``HomeTimelinePipeline``).

    query hydration      UserContextQueryHydrator (Redis), UserActionSequenceQueryHydrator (Redis),
                         ExperimentArmQueryHydrator (hash)
    candidate sources    CoEngagement, InNetwork (index author lists, or the pushed home timeline
                         + celebrity pulls), TagInterest, Trending, Popular - in parallel,
                         per-source timeout, fail-open
    candidate hydration  PostMetadataCandidateHydrator (author, created time, in-network)
    filters              PreviouslySeen -> HatedAuthor -> BlockedMutedAuthor -> MaxAge -> Duplicate
                         (cheapest first)
    feature hydration    FeastLayoutFeatureHydrator (or FeastSdkFeatureHydrator) + request features,
                         HistoryFeatureHydrator (each candidate against the user action sequence),
                         then RealtimeFeatureHydrator (fresh post counts from the stream processor)
    light ranker         LightRankerScorer over all candidates
    heavy ranker         TopKSelector (heavy_ranker_top_k by light score), then HeavyRankerScorer:
                         one probability per head
    blender              WeightedSumBlender with the arm's weights (both team arms' for an interleaving arm)
    selectors            AuthorDiversitySelector (decay + cap per author), ExplorationSelector (arms
                         that explore: slots drawn with logged propensities), InterleavingSelector
                         (interleaving arms: team-draft of two arms' rankings), PageSelector (+ cursor)
    side effects         ServedPostsSideEffect, ImpressionLogSideEffect, ExplorationLogSideEffect (exploring
                         arms' pools), FeatureLogSideEffect, DriftSampleSideEffect (the
                         served items' feature rows), ShadowScoringSideEffect (a challenger scores
                         a sampled share off the request path), RequestMetricsSideEffect

An experiment arm can serve its own rankers (``experiment.arms[].models``: the scorers pick the
arm's model per request) and its own candidate-source limits (``Query.source_limits``).

Filters run on core data (author, creation time) before feature hydration so filtered posts cost
no feature reads, as product-mixer runs filters before its feature hydrators. The stages run in
``mixer.pipeline_runner.PipelineRunner`` (timings, fail-open, metrics); the component interfaces
are in ``mixer.components``. Each stage's wall time is recorded in ``TimelineResult.timings_ms``.
"""

from __future__ import annotations

import functools
import math
import threading
import numbers
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, NamedTuple

import redis

from core.schema import HOME_SURFACE
from mixer.blenders import WeightedSumBlender
from mixer.caches import MixerCaches
from mixer.candidate import Query
from mixer.candidate_hydrators import PostMetadataCandidateHydrator
from mixer.candidate_sources import (
    CoEngagementCandidateSource, EmbeddingCandidateSource,
    InNetworkCandidateSource,
    PopularCandidateSource,
    TagInterestCandidateSource,
    TrendingCandidateSource,
)
from mixer.components import FeatureHydrator, TimelineResult
from mixer.config import MixerConfig
from mixer.feature_hydrators.history import HistoryFeatureHydrator
from mixer.feature_hydrators.retrieval import RetrievalScoreFeatureHydrator
from mixer.feature_hydrators.realtime import RealtimeFeatureHydrator, StreamLiveness
from mixer.filters import (
    BlockedMutedAuthorFilter,
    DuplicateFilter,
    HatedAuthorFilter,
    MaxAgeFilter,
    PreviouslySeenFilter,
)
from mixer.metrics import MixerMetrics
from mixer.pipeline_runner import CandidatePipeline, PipelineRunner, ScoringStage
from mixer.query_hydrators import (
    ExperimentArmQueryHydrator,
    UserActionSequenceQueryHydrator, UserEmbeddingQueryHydrator,
    UserContextQueryHydrator,
)
from mixer.redis_health import RedisHealth
from mixer.scorers import HeavyRankerScorer, LightRankerScorer, RankerHandle
from mixer.selectors import (AuthorDiversitySelector, ExplorationSelector, InterleavingSelector, PageCursor, PageSelector,
                             TopKSelector)
from mixer.side_effects import (
    DriftSampleSideEffect,
    ExplorationLogSideEffect,
    FeatureLogSideEffect,
    ImpressionLogSideEffect,
    RequestMetricsSideEffect,
    ServedPostsSideEffect,
    ShadowRunner,
    ShadowScoringSideEffect,
)
from mixer.side_effects.write_buffer import RedisWriteBuffer


@dataclass(frozen=True)
class Resilience:
    """What the components of one mixer process share across requests and model swaps: what
    serves through Redis faults (all optional: None = the component reads Redis directly and
    raises), and the shadow-scoring thread.

    Attributes:
        caches: shared reads keyed by store version, and last-known-good values (``mixer.caches``).
        health: Redis up / down: cached components fail fast while it is down (``mixer.redis_health``).
        liveness: what this process has seen of the stream processor (batch-only vs real-time mode).
        writes: the buffer of served-posts / impression-log writes Redis could not take.
        shadow: the background thread of shadow scoring (``experiment.shadow``; None: no shadow).
    """

    caches: MixerCaches | None = None
    health: RedisHealth | None = None
    liveness: StreamLiveness | None = None
    writes: RedisWriteBuffer | None = None
    shadow: ShadowRunner | None = None


class ServedModels(NamedTuple):
    """The loaded models of one mixer (``HomeTimelinePipeline.swap_rankers``' arguments, in order).

    Attributes:
        light, heavy: the served rankers (``models.alias``).
        retrieval: the embedding source's two-tower handle, or None.
        light_by_arm, heavy_by_arm: arm -> the ranker it serves instead (``experiment.arms[].models``).
        shadow_heavy: the challenger heavy ranker of ``experiment.shadow``, or None.
    """

    light: RankerHandle
    heavy: RankerHandle
    retrieval: object | None = None
    light_by_arm: dict | None = None
    heavy_by_arm: dict | None = None
    shadow_heavy: RankerHandle | None = None


@dataclass(frozen=True)
class RankerSet:
    """The models in use, swapped as one object so a request never mixes model versions: the
    scorers (each with its arms' own models), the retrieval model of the embedding source (a
    ``models.registry.TwoTowerHandle``, None when no two-tower model is registered) and the shadow
    challenger (None when ``experiment.shadow`` is off)."""

    light: LightRankerScorer
    heavy: HeavyRankerScorer
    retrieval: object | None = None
    shadow: HeavyRankerScorer | None = None

    @classmethod
    def of(cls, models: ServedModels) -> "RankerSet":
        """Scorers around loaded models.

        Raises:
            ValueError: a model needs features the mixer cannot hydrate, or an arm's model has other
                heads than the served one.
        """
        return cls(LightRankerScorer(models.light, by_arm=models.light_by_arm),
                   HeavyRankerScorer(models.heavy, by_arm=models.heavy_by_arm), models.retrieval,
                   HeavyRankerScorer(models.shadow_heavy) if models.shadow_heavy is not None else None)

    @property
    def model_versions(self) -> dict[str, str]:
        """``{"light_ranker": version, "heavy_ranker": version}`` (registered versions, str), plus
        ``"two_tower"`` when a retrieval model is served, ``"<ranker>:<arm>"`` for each arm that
        serves its own, and ``"heavy_ranker:shadow"`` for the shadow challenger."""
        versions = {"light_ranker": self.light.version, "heavy_ranker": self.heavy.version}
        for role, scorer in (("light_ranker", self.light), ("heavy_ranker", self.heavy)):
            versions |= {f"{role}:{arm}": v for arm, v in scorer.versions.items() if arm}
        if self.retrieval is not None:
            versions["two_tower"] = str(self.retrieval.version)
        if self.shadow is not None:
            versions["heavy_ranker:shadow"] = self.shadow.version
        return versions


def home_timeline(config: MixerConfig, rankers: RankerSet, *, client: redis.Redis,
                  feature_hydrator: FeatureHydrator, metrics: MixerMetrics,
                  resilience: Resilience = Resilience()) -> CandidatePipeline:
    """THE declaration of the home-timeline pipeline: its components per stage, in run order.

    A component that ``config`` switches off stays declared and answers ``enabled(query)`` False.

    Args:
        config: the mixer config (sources, filters, ranking, served, experiment, realtime).
        rankers: the light and heavy ranker scorers to serve.
        client: Redis with the candidate index, the stream processor's keys and served records.
        feature_hydrator: ``FeastLayoutFeatureHydrator`` or ``FeastSdkFeatureHydrator``.
        metrics: where the request-metrics side effect records.
        resilience: the process's caches, Redis health, stream liveness and write buffer (the
            feature hydrator gets its own at construction).

    Raises:
        ValueError: an arm weights a head the heavy ranker does not predict, or a setting is out of
            range (a component's constructor names it).
    """
    src, ranking = config.candidate_sources, config.ranking
    caches, health = resilience.caches, resilience.health
    arms = config.experiment.served_arms  # the holdout's arm included
    explorers = {a.name: a.exploration for a in arms if a.exploration is not None}
    interleaved = {a.name: a.interleave for a in arms if a.interleave is not None}
    blender = WeightedSumBlender({a.name: a.weights for a in arms if a.interleave is None}, rankers.heavy.heads,
                                 {a.name: a.light_score_exponent for a in arms if a.interleave is None}, interleaved)
    shadow = config.experiment.shadow
    return CandidatePipeline(
        query_hydrators=[
            UserContextQueryHydrator(client, config.served.ttl_seconds, caches=caches, health=health),
            UserActionSequenceQueryHydrator(client, config.action_sequence.max_length,
                                            enabled=config.action_sequence.enabled, health=health),
            UserEmbeddingQueryHydrator(rankers.retrieval,  # once for the embedding source and retrieval scores
                                       enabled=src.embedding.enabled and config.action_sequence.enabled),
            ExperimentArmQueryHydrator(config.experiment),
        ],
        candidate_sources=[  # priority order: the most personalised source names a post several returned
            CoEngagementCandidateSource(client, src.coengagement.max_candidates, src.coengagement.seed_posts,
                                        src.coengagement.neighbours_per_seed, src.coengagement.timeout_ms,
                                        enabled=src.coengagement.enabled, caches=caches, health=health),
            EmbeddingCandidateSource(rankers.retrieval, src.embedding.max_candidates, src.embedding.timeout_ms,
                                     enabled=src.embedding.enabled and config.action_sequence.enabled),
            InNetworkCandidateSource(client, src.in_network.max_candidates, src.in_network.max_authors,
                                     src.in_network.posts_per_author, src.in_network.timeout_ms,
                                     caches=caches, health=health, read=src.in_network.read,  # index | timeline:
                                     max_celebrity_pulls=config.fanout.max_celebrity_pulls),  # pushed + pulled
            TagInterestCandidateSource(client, src.tag_interest.max_candidates, src.tag_interest.top_tags,
                                       src.tag_interest.timeout_ms, caches=caches, health=health),
            TrendingCandidateSource(client, src.trending.max_candidates, src.trending.timeout_ms,
                                    enabled=src.trending.enabled,  # before popular: trending and popular is trending
                                    caches=caches, health=health),
            PopularCandidateSource(client, src.popular.max_candidates, src.popular.window, src.popular.timeout_ms,
                                   caches=caches, health=health),
        ],
        candidate_hydrators=[
            PostMetadataCandidateHydrator(client, caches=caches, health=health),
        ],
        filters=[  # cheapest first
            PreviouslySeenFilter(),
            HatedAuthorFilter(),
            BlockedMutedAuthorFilter(),
            MaxAgeFilter(config.filters.max_post_age_days),
            DuplicateFilter(),
        ],
        feature_hydrators=[
            feature_hydrator,  # stage feature_hydration: the Feast online store + request features
            HistoryFeatureHydrator(client, src.coengagement.seed_posts, src.coengagement.neighbours_per_seed,
                                   enabled=config.action_sequence.enabled, caches=caches, health=health),
            RetrievalScoreFeatureHydrator(rankers.retrieval,  # both need the user's sequence
                                          enabled=src.embedding.enabled and config.action_sequence.enabled),
            RealtimeFeatureHydrator(client, config.realtime.max_staleness_s, enabled=config.realtime.enabled,
                                    liveness=resilience.liveness, health=health),
        ],
        scoring=[
            ScoringStage("light_ranker", scorers=[rankers.light]),
            ScoringStage("heavy_ranker", selectors=[TopKSelector(ranking.heavy_ranker_top_k)],
                         scorers=[rankers.heavy]),
            ScoringStage("blender", scorers=[blender]),
        ],
        selectors=[
            AuthorDiversitySelector(config.filters.max_posts_per_author, ranking.author_diversity_decay,
                                    ranking.author_diversity_floor),
            ExplorationSelector(explorers),
            InterleavingSelector(interleaved),
            PageSelector(),
        ],
        side_effects=[
            ServedPostsSideEffect(client, config.served.ttl_seconds, config.served.max_per_user,
                                  buffer=resilience.writes),
            ImpressionLogSideEffect(client, config.served.impression_stream_maxlen, buffer=resilience.writes,
                                    experiment_id=config.experiment.id),
            ExplorationLogSideEffect(client, config.served.exploration_stream_maxlen, explorers,
                                     buffer=resilience.writes),
            FeatureLogSideEffect(client, config.feature_logging.stream_maxlen,
                                 enabled=config.feature_logging.enabled, buffer=resilience.writes),
            DriftSampleSideEffect(client, config.drift_sample.rate, config.drift_sample.per_request,
                                  config.drift_sample.stream_maxlen, enabled=config.drift_sample.enabled),
            ShadowScoringSideEffect(rankers.shadow, blender, resilience.shadow, client,
                                    shadow.share if shadow else 1.0, shadow.stream_maxlen if shadow else 1),
            RequestMetricsSideEffect(metrics),  # after_total: sees every timing, "total" included
        ],
    )


@dataclass(frozen=True)
class _Serving:
    """What one request runs with, replaced as one attribute: the config, the rankers and the
    runner of the pipeline declared with them."""

    config: MixerConfig
    rankers: RankerSet
    runner: PipelineRunner


class HomeTimelinePipeline:
    """One home-timeline request from user id to ranked page (the stages: module docstring).

    Build it with ``build_pipeline``; call ``run``. Thread-safe (no per-request state on self).

    Args:
        config: the mixer config (page sizes, clock).
        declare: ``RankerSet`` -> the pipeline declaration serving those rankers (``home_timeline``
            with its resources bound); called again by ``swap_rankers``.
        rankers: the rankers to serve first.
        executor: thread pool of the candidate sources (the caller shuts it down).
        metrics: the mixer's metrics.

    Raises:
        ValueError: the declaration is invalid (``declare`` or ``CandidatePipeline`` name it).
    """

    def __init__(self, *, config: MixerConfig, declare: Callable[[RankerSet], CandidatePipeline],
                 rankers: RankerSet, executor: ThreadPoolExecutor, metrics: MixerMetrics):
        self.declare = declare
        self._swap = threading.Lock()  # the model watcher and the config watcher swap from their threads
        self.executor = executor
        self.metrics = metrics
        self._serving = _Serving(config, rankers, PipelineRunner(declare(rankers), executor=executor,
                                                                 metrics=metrics))

    @property
    def config(self) -> MixerConfig:
        """The config serving new requests (``reconfigure`` replaces it)."""
        return self._serving.config

    @property
    def rankers(self) -> RankerSet:
        """The rankers serving new requests."""
        return self._serving.rankers

    @property
    def declaration(self) -> CandidatePipeline:
        """The pipeline declaration serving new requests."""
        return self._serving.runner.pipeline

    @property
    def model_versions(self) -> dict[str, str]:
        """``{"light_ranker": version, "heavy_ranker": version}`` serving new requests."""
        return self._serving.rankers.model_versions

    def swap_rankers(self, light: RankerHandle, heavy: RankerHandle, retrieval=None, light_by_arm=None,
                     heavy_by_arm=None, shadow_heavy=None) -> None:
        """Serve new model versions from the next request on (in-flight requests finish on the old).
        The arguments are :class:`ServedModels`' fields (``swap_rankers(*models)``).

        ``retrieval``: the two-tower handle of the embedding source (None: none is served);
        ``light_by_arm`` / ``heavy_by_arm``: arm -> its own ranker; ``shadow_heavy``: the shadow
        challenger.

        The pipeline is declared again with the new rankers, and rankers + declaration are replaced
        by one attribute assignment (atomic for readers): a request never mixes versions.

        Raises:
            ValueError: the new heavy ranker has other heads than the blender's (a restart with a
                matching config is needed), or a model needs features the mixer cannot hydrate.
        """
        new = RankerSet.of(ServedModels(light, heavy, retrieval, light_by_arm, heavy_by_arm, shadow_heavy))
        with self._swap:
            current = self._serving
            if list(new.heavy.heads) != list(current.rankers.heavy.heads):
                raise ValueError(f"heavy ranker v{heavy.version} has heads {list(new.heavy.heads)}, "
                                 f"the running blender expects {list(current.rankers.heavy.heads)}")
            runner = PipelineRunner(self.declare(new), executor=self.executor, metrics=self.metrics)
            self._serving = _Serving(current.config, new, runner)  # one attribute assignment: atomic for readers
        self.metrics.set_model_versions(new.model_versions)

    def reconfigure(self, config: MixerConfig, declare: Callable[[RankerSet], CandidatePipeline],
                    light_by_arm: dict | None = None, heavy_by_arm: dict | None = None,
                    shadow_heavy: RankerHandle | None = None) -> None:
        """Serve a new experiment from the next request on (``mixer.config_watcher``): ``config``
        and the pipeline ``declare`` binds it to, with the served rankers kept and the experiment's
        own (``ServedModels.light_by_arm``, ``heavy_by_arm``, ``shadow_heavy``) replaced. The new
        declaration is built before anything is replaced, so an experiment the models do not fit
        leaves the running one serving.

        Raises:
            ValueError: the experiment does not fit the models (an arm weighs a head the heavy
                ranker does not predict; an arm's model has other heads).
        """
        with self._swap:
            current = self._serving.rankers
            new = RankerSet.of(ServedModels(current.light.handle, current.heavy.handle, current.retrieval,
                                            light_by_arm, heavy_by_arm, shadow_heavy))
            runner = PipelineRunner(declare(new), executor=self.executor, metrics=self.metrics)
            self._serving = _Serving(config, new, runner)
            self.declare = declare
        self.metrics.set_model_versions(new.model_versions)

    def run(self, user_id: int, page_size: int | None = None, cursor: PageCursor | None = None,
            surface: int = HOME_SURFACE, quality_factor: float = 1.0) -> TimelineResult:
        """Rank one page of ``user_id``'s home timeline.

        Args:
            user_id: the viewer (unknown users get a cold-start timeline of popular posts).
            page_size: posts per page, 1..page.max_size (default page.default_size).
            cursor: the previous page's cursor (None for the first page).
            surface: the product surface (KuaiRand ``tab`` id, int >= 0; default the home surface
                ``core.schema.HOME_SURFACE``); ids outside ``KNOWN_SURFACES`` rank as "other".
            quality_factor: the share of the full work in (0, 1] (``mixer.quality_factor``).

        Raises:
            ValueError: page_size out of range, or a negative surface.
            TypeError: surface is not an int (bools included).
            redis.RedisError: Redis is unreachable and a component has no fallback (built without
                ``Resilience``: the API then answers 503).
        """
        serving = self._serving  # one snapshot per request: versions and config cannot change mid-request
        cfg = serving.config
        size = cfg.page.default_size if page_size is None else int(page_size)
        if not 1 <= size <= cfg.page.max_size:
            raise ValueError(f"page size must be between 1 and {cfg.page.max_size}, got {size}")
        if isinstance(surface, bool) or not isinstance(surface, numbers.Integral):
            raise TypeError(f"surface must be an int, got {type(surface).__name__}")
        if surface < 0:
            raise ValueError(f"surface must be >= 0, got {surface}")
        if not 0.0 < quality_factor <= 1.0:
            raise ValueError(f"quality factor must be in (0, 1], got {quality_factor}")
        cursor = cursor or PageCursor(0, ())
        query = Query(user_id=int(user_id), page_size=size, now_s=cfg.clock.now_s(), request_id=uuid.uuid4().hex,
                      excluded_posts=frozenset(cursor.served), page_index=cursor.page_index, cursor=cursor,
                      surface=int(surface), quality_factor=float(quality_factor))
        return serving.runner.run(query)


def declaration(config: MixerConfig, *, client: redis.Redis, feature_hydrator: FeatureHydrator,
                metrics: MixerMetrics, resilience: Resilience = Resilience()) -> Callable[[RankerSet], CandidatePipeline]:
    """``home_timeline`` with ``config`` and the process's resources bound: ``RankerSet`` -> the
    pipeline declaration (``HomeTimelinePipeline``'s ``declare``; ``reconfigure`` takes a new one)."""
    return functools.partial(home_timeline, config, client=client, feature_hydrator=feature_hydrator,
                             metrics=metrics, resilience=resilience)


def build_pipeline(config: MixerConfig, *, client: redis.Redis, light: RankerHandle, heavy: RankerHandle,
                   feature_hydrator: FeatureHydrator, executor: ThreadPoolExecutor,
                   metrics: MixerMetrics, resilience: Resilience = Resilience(),
                   retrieval=None, light_by_arm: dict | None = None, heavy_by_arm: dict | None = None,
                   shadow_heavy: RankerHandle | None = None) -> HomeTimelinePipeline:
    """Assemble the home-timeline pipeline (``home_timeline``) from the config and already-opened resources.

    Args:
        client: Redis with the candidate index (and served records).
        light, heavy: loaded rankers (``models.registry.load_ranker``).
        retrieval: the loaded two-tower model (``models.registry.load_two_tower``), or None.
        light_by_arm, heavy_by_arm: arm -> the ranker it serves instead (``experiment.arms[].models``).
        shadow_heavy: the challenger of ``experiment.shadow`` (needs ``resilience.shadow``), or None.
        feature_hydrator: ``FeastLayoutFeatureHydrator`` or ``FeastSdkFeatureHydrator``.
        executor: thread pool for candidate sources (caller shuts it down).
        metrics: where the pipeline records metrics.
        resilience: the process's caches, Redis health, stream liveness and write buffer.

    Raises:
        ValueError: the models do not fit the config (unknown features, arm weights of missing heads).
    """
    pipeline = HomeTimelinePipeline(
        config=config,
        declare=declaration(config, client=client, feature_hydrator=feature_hydrator, metrics=metrics,
                            resilience=resilience),
        rankers=RankerSet.of(ServedModels(light, heavy, retrieval, light_by_arm, heavy_by_arm, shadow_heavy)),
        executor=executor, metrics=metrics,
    )
    metrics.set_model_versions(pipeline.model_versions)
    return pipeline


def finite(x: float) -> float | None:
    """``x`` for JSON, or None if NaN/inf (JSON has no NaN)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


__all__ = ["HomeTimelinePipeline", "RankerSet", "Resilience", "ServedModels", "declaration", "TimelineResult", "build_pipeline", "finite", "home_timeline"]
