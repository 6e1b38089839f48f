"""A generic candidate-pipeline runner: stage order, per-stage timings, fail-open handling, metrics.

A pipeline is declared as a ``CandidatePipeline``: one list of components per stage
(``mixer.components`` defines each kind). ``PipelineRunner.run`` calls them in this order:

    stage (timings_ms key)   components                       on error
    query_hydration          query hydrators, in order        raise (the request fails)
    candidate_sources        candidate sources, in parallel   skip the source (ParallelSourceRunner)
    candidate_hydration      candidate hydrators, in order    raise
    (each of the above, and feature hydrators and side effects: ``Fallback(value)`` = go on with
    ``value``, degraded += the stage; see ``mixer.components.Fallback``)
    filters                  filters, in order                raise
    <hydrator.stage>         feature hydrators, in order      fail open: degraded += stage
    <scoring stage name>     per ScoringStage: its selectors,
                             then its scorers                 raise
    selectors                selectors, in order              raise
    side_effects             side effects, in order           fail open: counted
    total                    (whole request)
    -                        side effects with after_total    fail open: counted

as product-mixer's candidate pipeline and X's ``CandidatePipeline::execute`` do. A component
whose ``enabled(query)`` is False is skipped as if it were not declared. The fixed stages are
always in ``timings_ms``; a stage named by components (a feature hydrator's ``stage``, a
``ScoringStage``'s name) is there when one of its components ran, and several components of one
stage add up. Timings are wall milliseconds from ``time.perf_counter``, rounded to 1 us.

The runner adds a few microseconds per request (one ``enabled`` call per component, one clock
read per stage); it never copies the feature frame (a feature hydrator or a selector that
returns a new frame is the only copy).

The result carries the frame as the scoring stages left it and the candidates in its row order
(``TimelineResult.features`` / ``ranked``, references, not copies), so a side effect can read the
feature rows of the served items (``TimelineResult.item_features``: feature logging).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from mixer.candidate import Candidate, Query
from mixer.candidate_sources import ParallelSourceRunner
from mixer.components import (
    CandidateHydrator,
    CandidateSource,
    Fallback,
    FeatureHydrator,
    Filter,
    QueryHydrator,
    Scorer,
    Selector,
    SideEffect,
    TimelineResult,
)
from mixer.feature_hydrators.frame import missing_feature_frame
from mixer.metrics import MixerMetrics

log = logging.getLogger(__name__)

QUERY_HYDRATION = "query_hydration"
CANDIDATE_SOURCES = "candidate_sources"
CANDIDATE_HYDRATION = "candidate_hydration"
FILTERS = "filters"
SELECTORS = "selectors"
SIDE_EFFECTS = "side_effects"
TOTAL = "total"
FIXED_STAGES = (QUERY_HYDRATION, CANDIDATE_SOURCES, CANDIDATE_HYDRATION, FILTERS, SELECTORS, SIDE_EFFECTS, TOTAL)


@dataclass(frozen=True)
class ScoringStage:
    """One timed scoring step: its ``selectors`` choose (and order) the candidates, then its
    ``scorers`` score them (product-mixer's scoring pipeline: selectors, then scorers).

    Attributes:
        name: the ``timings_ms`` key (e.g. "light_ranker", "heavy_ranker", "blender").
        scorers: run in order on the selected candidates.
        selectors: run first, in order; each must return the feature rows of the candidates it
            keeps (``SelectorResult.features``), since the scorers read them.
    """

    name: str
    scorers: Sequence[Scorer] = ()
    selectors: Sequence[Selector] = ()

    def __post_init__(self):
        object.__setattr__(self, "scorers", tuple(self.scorers))
        object.__setattr__(self, "selectors", tuple(self.selectors))


def _check(kind: str, components: Sequence, methods: tuple[str, ...], attributes: tuple[str, ...] = (),
           unique: bool = False) -> None:
    """Raise TypeError if a component lacks ``name``/``enabled``/``methods``/``attributes``;
    ValueError if ``unique`` and two share a name."""
    for c in components:
        if not isinstance(getattr(c, "name", None), str):
            raise TypeError(f"{kind} {c!r} has no name (str)")
        for m in ("enabled", *methods):
            if not callable(getattr(c, m, None)):
                raise TypeError(f"{kind} {c.name!r} has no {m}() method (see mixer.components)")
        for a in attributes:
            if not hasattr(c, a):
                raise TypeError(f"{kind} {c.name!r} has no {a} attribute (see mixer.components)")
    names = [c.name for c in components]
    if unique and len(set(names)) != len(names):
        raise ValueError(f"{kind} names must be unique in a pipeline, got {names}")


@dataclass(frozen=True)
class CandidatePipeline:
    """The declaration of a pipeline: its components per stage, each list in run order.

    Lists are stored as tuples; the declaration is immutable, so swapping one (new model
    versions) is one attribute assignment in its owner.

    Attributes:
        query_hydrators, candidate_sources, candidate_hydrators, filters, feature_hydrators,
        selectors, side_effects: the components of each stage (``mixer.components``), in order.
            Candidate sources in priority order (earlier sources win duplicates downstream).
        scoring: the scoring stages, in order.
        model_versions: scorer name -> version of the scorers that serve a registered model
            (non-empty ``version``), plus the registered models of candidate sources that serve
            one (``served_model`` -> ``version``, e.g. the two-tower of the embedding source); derived.

    Raises:
        TypeError: a component lacks its kind's name, ``enabled`` or methods.
        ValueError: two sources, filters, scorers or side effects share a name, or a stage name is
            used twice (a scoring stage named like a fixed stage or another scoring stage, or a
            feature hydrator's stage named like a fixed or scoring stage).
    """

    query_hydrators: Sequence[QueryHydrator] = ()
    candidate_sources: Sequence[CandidateSource] = ()
    candidate_hydrators: Sequence[CandidateHydrator] = ()
    filters: Sequence[Filter] = ()
    feature_hydrators: Sequence[FeatureHydrator] = ()
    scoring: Sequence[ScoringStage] = ()
    selectors: Sequence[Selector] = ()
    side_effects: Sequence[SideEffect] = ()
    model_versions: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("query_hydrators", "candidate_sources", "candidate_hydrators", "filters", "feature_hydrators",
                     "scoring", "selectors", "side_effects"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        scorers = [s for stage in self.scoring for s in stage.scorers]
        _check("query hydrator", self.query_hydrators, ("hydrate",))
        _check("candidate source", self.candidate_sources, ("fetch",), ("timeout_ms",), unique=True)
        _check("candidate hydrator", self.candidate_hydrators, ("hydrate",))
        _check("filter", self.filters, ("apply",), unique=True)
        _check("feature hydrator", self.feature_hydrators, ("hydrate",), ("stage",))
        _check("scorer", scorers, ("score",), ("version",), unique=True)
        _check("selector", [s for stage in self.scoring for s in stage.selectors] + list(self.selectors), ("select",))
        _check("side effect", self.side_effects, ("apply",), ("after_total",), unique=True)
        scoring_names = [stage.name for stage in self.scoring]
        clash = [n for n in scoring_names if n in FIXED_STAGES or scoring_names.count(n) > 1]
        clash += [h.stage for h in self.feature_hydrators if h.stage in FIXED_STAGES or h.stage in scoring_names]
        if clash:
            raise ValueError(f"stage names {sorted(set(clash))} are used twice; fixed stages are {list(FIXED_STAGES)}")
        versions = {s.name: str(s.version) for s in scorers if s.version}
        versions |= {src.served_model: str(src.version) for src in self.candidate_sources
                     if getattr(src, "served_model", None) and getattr(src, "version", "")}
        object.__setattr__(self, "model_versions", versions)


def _missing_features(query: Query, candidates: list[Candidate]):
    """The fail-open frame: NaN features, except the id buckets (computed from the ids alone)."""
    return missing_feature_frame(len(candidates), user_id=query.user_id,
                                 post_ids=[c.post_id for c in candidates],
                                 author_ids=[c.author_id for c in candidates])


class _StageClock:
    """Wall milliseconds per stage, in first-lap order (``perf_counter``, rounded to 1 us)."""

    __slots__ = ("start", "last", "timings")

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.timings: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        """Add the time since the previous lap to ``stage``."""
        now = time.perf_counter()
        ms = (now - self.last) * 1000.0
        before = self.timings.get(stage)
        self.timings[stage] = round(ms if before is None else before + ms, 3)
        self.last = now

    def total(self) -> None:
        """Record "total": the time since the clock started."""
        self.timings[TOTAL] = round((time.perf_counter() - self.start) * 1000.0, 3)


class PipelineRunner:
    """Runs one ``CandidatePipeline`` for a query (see the module docstring for the order).

    Holds no per-request state: one runner serves concurrent requests. The declaration is fixed
    for the runner's life; to serve another (new model versions), build another runner.

    Args:
        pipeline: the declaration.
        executor: thread pool of the candidate sources (the caller owns and shuts it down).
        metrics: where scoring paths (``hm_mixer_scoring_total``) and side-effect failures
            (``hm_mixer_side_effect_failures_total``) are counted; the other request metrics are
            the request-metrics side effect's.

    Raises:
        ValueError: duplicate candidate source names (``ParallelSourceRunner``).
    """

    def __init__(self, pipeline: CandidatePipeline, *, executor: ThreadPoolExecutor, metrics: MixerMetrics):
        self.pipeline = pipeline
        self.metrics = metrics
        self.sources = ParallelSourceRunner(list(pipeline.candidate_sources), executor)

    def run(self, query: Query) -> TimelineResult:
        """Run every stage for ``query`` (``page_size`` and ``cursor`` set) and return the result
        the side effects saw.

        Raises:
            Exception: whatever a query hydrator, candidate hydrator, filter, scorer or selector
                raised (``redis.RedisError`` when Redis is unreachable: the API answers 503).
        """
        p = self.pipeline
        clock = _StageClock()
        degraded: list[str] = []

        for query_hydrator in p.query_hydrators:
            if query_hydrator.enabled(query):
                try:
                    query = query_hydrator.hydrate(query)
                except Fallback as f:
                    query = f.value
                    self._degraded(degraded, QUERY_HYDRATION, query_hydrator.name, query, f)
        clock.lap(QUERY_HYDRATION)

        candidates, source_results = self.sources.run(query)
        retrieved = len(candidates)
        if any(r.status == "fallback" for r in source_results):
            degraded.append(CANDIDATE_SOURCES)
        clock.lap(CANDIDATE_SOURCES)

        for candidate_hydrator in p.candidate_hydrators:
            if candidate_hydrator.enabled(query):
                try:
                    candidates, _dropped = candidate_hydrator.hydrate(query, candidates)
                except Fallback as f:
                    candidates, _dropped = f.value
                    self._degraded(degraded, CANDIDATE_HYDRATION, candidate_hydrator.name, query, f)
        hydrated = len(candidates)
        clock.lap(CANDIDATE_HYDRATION)

        filtered: dict[str, int] = {}
        for f in p.filters:
            if f.enabled(query):
                outcome = f.apply(query, candidates)
                candidates = outcome.kept
                filtered[f.name] = len(outcome.removed)
        after_filters = len(candidates)
        clock.lap(FILTERS)

        features = None  # no frame until a feature hydrator builds one
        for hydrator in p.feature_hydrators:
            if not hydrator.enabled(query):
                continue
            try:
                features = hydrator.hydrate(query, candidates, features)
            except Fallback as f:
                features = f.value
                self._degraded(degraded, hydrator.stage, hydrator.name, query, f)
            except Exception as e:  # noqa: BLE001 - fail-open: rank with missing features, not no timeline
                log.warning("feature hydrator %s failed for user %s: %r; stage %s degraded, ranking with the "
                            "features hydrated before it (NaN where none)", hydrator.name, query.user_id, e,
                            hydrator.stage)
                if hydrator.stage not in degraded:
                    degraded.append(hydrator.stage)
                if features is None:
                    features = _missing_features(query, candidates)
            clock.lap(hydrator.stage)
        if features is None:  # no feature hydrator ran
            features = _missing_features(query, candidates)

        paths: dict[str, str] = {}
        versions = dict(p.model_versions)
        for stage in p.scoring:
            ran = False
            for selector in stage.selectors:
                if selector.enabled(query):
                    ran = True
                    chosen = selector.select(query, candidates, features)
                    if chosen.features is None:
                        raise TypeError(f"selector {selector.name!r} of scoring stage {stage.name!r} returned no "
                                        "feature rows; the scorers after it need them")
                    candidates, features = chosen.candidates, chosen.features
            for scorer in stage.scorers:
                if scorer.enabled(query):
                    ran = True
                    path = scorer.score(query, candidates, features)
                    version_for = getattr(scorer, "version_for", None)
                    if version_for is not None:  # an arm serving its own model
                        versions[scorer.name] = version_for(query)
                    if path is not None:
                        paths[scorer.name] = path
                        self.metrics.scoring.labels(model=scorer.name, path=path).inc()
            if ran:
                clock.lap(stage.name)
        ranked = len(candidates)
        scored, scored_features = candidates, features  # references: row i of the frame = scored[i]

        next_cursor = None
        for selector in p.selectors:
            if selector.enabled(query):
                chosen = selector.select(query, candidates, features)
                candidates, features = chosen.candidates, chosen.features
                if chosen.next_cursor is not None:
                    next_cursor = chosen.next_cursor
        clock.lap(SELECTORS)

        result = TimelineResult(
            query=query, items=candidates, next_cursor=next_cursor, timings_ms=clock.timings,
            source_results=source_results, filtered=filtered,
            counts={"retrieved": retrieved, "hydrated": hydrated, "after_filters": after_filters,
                    "heavy_ranked": ranked, "selected": len(candidates)},
            model_versions=versions, degraded=degraded, scoring_paths=paths,
            ranked=scored, features=scored_features,
        )

        after_total = []
        for effect in p.side_effects:
            if effect.enabled(query):
                if effect.after_total:
                    after_total.append(effect)
                else:
                    self._side_effect(effect, result, degraded)
        clock.lap(SIDE_EFFECTS)
        clock.total()
        for effect in after_total:
            self._side_effect(effect, result)
        return result

    @staticmethod
    def _degraded(degraded: list[str], stage: str, component: str, query: Query, fallback: Fallback) -> None:
        """Record that ``component`` of ``stage`` answered with a fallback."""
        log.info("%s fell back for user %s: %s; stage %s degraded", component, query.user_id, fallback.reason, stage)
        if stage not in degraded:
            degraded.append(stage)

    def _side_effect(self, effect: SideEffect, result: TimelineResult, degraded: list[str] | None = None) -> None:
        """``effect.apply(result)``, fail-open: an exception is logged and counted; a ``Fallback``
        (e.g. the write was buffered) adds "side_effects" to ``degraded`` (before "total":
        the after-total side effects see it)."""
        try:
            effect.apply(result)
        except Fallback as f:
            if degraded is not None:
                self._degraded(degraded, SIDE_EFFECTS, effect.name, result.query, f)
        except Exception as e:  # noqa: BLE001 - fail-open: the page is served anyway
            log.warning("side effect %s failed for user %s: %r", effect.name, result.query.user_id, e)
            self.metrics.side_effect_failures.labels(side_effect=effect.name).inc()


__all__ = ["CandidatePipeline", "FIXED_STAGES", "PipelineRunner", "ScoringStage"]
