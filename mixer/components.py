"""The component interfaces of a candidate pipeline, and the values they hand to the runner.

One ``Protocol`` per component kind, in the order ``mixer.pipeline_runner.PipelineRunner`` calls
them (Twitter's product-mixer ``functional_component`` traits; X's ``candidate-pipeline`` crate):

    QueryHydrator      hydrate(query) -> Query                                    (raises: request fails)
    CandidateSource    fetch(query) -> list[Candidate]                (parallel, per-source timeout, fail-open)
    CandidateHydrator  hydrate(query, candidates) -> (candidates, dropped)        (raises: request fails)
    Filter             apply(query, candidates) -> FilterResult(kept, removed)    (raises: request fails)
    FeatureHydrator    hydrate(query, candidates, features) -> features           (fail-open: ``degraded``)
    Scorer             score(query, candidates, features) -> scoring path | None  (raises: request fails)
    Selector           select(query, candidates, features) -> SelectorResult      (raises: request fails)
    SideEffect         apply(result: TimelineResult) -> None                      (fail-open: counted)

Every component has a ``name: str`` (metric label, key of ``TimelineResult.filtered`` /
``scoring_paths``; unique within its kind in one pipeline) and an ``enabled(query) -> bool`` gate:
the component decides from its own configuration whether it runs for this query (a disabled
component is skipped as if it were not declared: no timing, no count, no source result). A class
that subclasses its protocol explicitly (``class MyFilter(Filter)``) inherits ``enabled`` = always
on, as the Rust traits default ``enable`` to true; a class that only matches structurally must
define it.

Components hold configuration and clients, never per-request state: one instance serves
concurrent requests from several threads.

A query hydrator, candidate source, candidate hydrator, feature hydrator or side effect that
cannot do its job but has a usable answer (a last-known-good value while Redis is down, an empty
user context, a buffered write) raises ``Fallback(value)``: the runner goes on with ``value``
and adds the stage to ``TimelineResult.degraded``. The answer travels in the exception rather than
in a per-request flag, so components stay free of per-request state and a stage that fell back
cannot forget to say so.
"""

from __future__ import annotations

from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, ClassVar, Protocol

from mixer.candidate import Candidate, Query

if TYPE_CHECKING:  # annotations only: these modules import this one
    import numpy as np
    import pandas as pd

    from mixer.candidate_sources.base import SourceResult
    from mixer.selectors.page_cursor import PageCursor


class Fallback(Exception):
    """Raised by a component that answers with a fallback instead of its normal result.

    Args:
        value: what the stage goes on with, of the type the method would have returned (a query
            hydrator: the ``Query``; a source: its candidates; a candidate hydrator: ``(candidates,
            dropped)``; a feature hydrator: the frame; a side effect: None).
        reason: why (logs), e.g. "Redis unavailable: last-known-good post features".
    """

    def __init__(self, value, reason: str):
        super().__init__(reason)
        self.value = value
        self.reason = reason


class QueryHydrator(Protocol):
    """Adds request context to the query before candidates are fetched (user graph, arm...).

    Attributes:
        name: short name (logs).
    """

    name: str

    def enabled(self, query: Query) -> bool:
        """True if this hydrator runs for ``query`` (the query as hydrated by the hydrators before it)."""
        return True

    def hydrate(self, query: Query) -> Query:
        """A copy of ``query`` with this hydrator's fields set (``Query`` is immutable:
        ``dataclasses.replace``).

        Raises:
            Exception: any error fails the request (the query cannot be personalised; the API
                answers 503 for ``redis.RedisError``).
        """
        ...


class CandidateSource(Protocol):
    """A source of candidates. ``fetch`` may raise or be slow; the runner
    (``ParallelSourceRunner``) logs it, reports it and goes on without it.

    Attributes:
        name: short name, used as ``Candidate.source`` and as a metric label.
        timeout_ms: the runner stops waiting for this source after this many milliseconds
            (measured from the start of the candidate-sources stage).
    """

    name: str
    timeout_ms: float

    def enabled(self, query: Query) -> bool:
        """True if this source is called for ``query``."""
        return True

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates for ``query`` (any order; the source's best first is customary)."""
        ...


class CandidateHydrator(Protocol):
    """Fills the core data of candidates (author, creation time) that filters need.

    Attributes:
        name: short name (logs).
    """

    name: str

    def enabled(self, query: Query) -> bool:
        """True if this hydrator runs for ``query``."""
        return True

    def hydrate(self, query: Query, candidates: list[Candidate]) -> tuple[list[Candidate], int]:
        """Hydrate in place; return ``(the candidates that could be hydrated, in input order,
        the number dropped because their core data is missing)``.

        Raises:
            Exception: any error fails the request (``redis.RedisError``: the API answers 503).
        """
        ...


@dataclass(slots=True)
class FilterResult:
    """What one filter did (product-mixer's ``FilterResult``, X's ``FilterResult { kept, removed }``).

    Attributes:
        kept: candidates that go on, in input order.
        removed: candidates the filter dropped, in input order; ``len(removed)`` is the filter's
            count in ``TimelineResult.filtered`` and ``hm_mixer_filtered_total{filter}``.
    """

    kept: list[Candidate]
    removed: list[Candidate] = field(default_factory=list)

    @classmethod
    def drop_members(cls, candidates: list[Candidate], attribute: str, members: AbstractSet[int]) -> "FilterResult":
        """Remove the candidates whose ``attribute`` (e.g. ``"author_id"``) is in ``members``.

        One pass, input order kept on both sides; with no members, nothing is copied.
        """
        if not members:
            return cls(candidates, [])
        kept: list[Candidate] = []
        removed: list[Candidate] = []
        keep, drop = kept.append, removed.append
        get = attrgetter(attribute)
        for c in candidates:
            if get(c) in members:
                drop(c)
            else:
                keep(c)
        return cls(kept, removed)


class Filter(Protocol):
    """Drops candidates before feature hydration, on core data only (cheapest first).

    Attributes:
        name: short name: key of ``TimelineResult.filtered`` and the ``filter`` metric label.
    """

    name: str

    def enabled(self, query: Query) -> bool:
        """True if this filter runs for ``query`` (a disabled filter has no ``filtered`` entry)."""
        return True

    def apply(self, query: Query, candidates: list[Candidate]) -> FilterResult:
        """Partition ``candidates`` into kept and removed (each in input order; every candidate in
        exactly one of them). ``kept`` may be ``candidates`` itself when nothing is removed."""
        ...


class FeatureHydrator(Protocol):
    """Builds or refines the feature frame of the candidates.

    The frame is a float64 ``pd.DataFrame`` with columns ``core.schema.ALL_FEATURES``, row i =
    ``candidates[i]``, index 0..N-1, NaN where a value is missing. Hydrators run in declaration
    order; each gets the frame the ones before it produced (None before the first) and returns the
    frame to go on with (its input itself, a new frame, or the input with columns replaced; the
    runner never copies it).

    Fail-open: when ``hydrate`` raises, the runner logs it, adds ``stage`` to
    ``TimelineResult.degraded`` and keeps the frame hydrated so far (when no hydrator has produced
    one yet: all NaN but the id buckets, ``frame.missing_feature_frame``): the timeline is ranked
    with missing features rather than not served.

    Attributes:
        name: short name (logs).
        stage: key of ``TimelineResult.timings_ms`` this hydrator's wall time is added to, and the
            value it adds to ``degraded`` when it fails (e.g. "feature_hydration",
            "realtime_features"). A stage appears in ``timings_ms`` only when one of its
            hydrators ran.
    """

    name: str
    stage: str = "feature_hydration"

    def enabled(self, query: Query) -> bool:
        """True if this hydrator runs for ``query``."""
        return True

    def hydrate(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None) -> pd.DataFrame:
        """The frame of ``candidates`` (see the class docstring for its shape and dtype).

        Raises:
            Exception: any error; the runner fails open (class docstring).
        """
        ...


class Scorer(Protocol):
    """Scores candidates in place (``Candidate.light_score``, ``heads``, ``score``).

    Attributes:
        name: short name: key of ``TimelineResult.scoring_paths`` and ``model_versions``, and the
            ``model`` label of ``hm_mixer_scoring_total``.
        version: the registered model version it serves, or "" for a scorer without a model
            (the blender); non-empty versions are reported in ``TimelineResult.model_versions``.
            A scorer whose model depends on the query's arm also has ``version_for(query) -> str``
            (``mixer.scorers.RankerScorer``): the runner reports that version for the request.
    """

    name: str

    @property
    def version(self) -> str:
        """See the class docstring (a class attribute or a property)."""
        ...

    def enabled(self, query: Query) -> bool:
        """True if this scorer runs for ``query``."""
        return True

    def score(self, query: Query, candidates: list[Candidate], features: pd.DataFrame) -> str | None:
        """Score ``candidates`` in place; ``features`` row i belongs to ``candidates[i]`` (float64,
        ``ALL_FEATURES`` columns).

        Returns:
            The scoring path that served the call ("in_process", "triton_grpc", "triton_http",
            "bentoml", "in_process_fallback"), counted in ``hm_mixer_scoring_total`` and reported in
            ``scoring_paths``; None when there is no path to report (nothing to score, no model).

        Raises:
            Exception: any error fails the request (remote scorers fall back in-process themselves).
        """
        ...


@dataclass(slots=True)
class SelectorResult:
    """What one selector kept, in its new order.

    Attributes:
        candidates: the selected candidates, best first.
        features: the feature rows of ``candidates`` (row i = candidates[i], index 0..len-1), for a
            selector whose output is scored afterwards (top K inside a scoring stage, where the
            runner requires it); None when the selector does not carry the frame (the selectors
            after scoring): later selectors then get None.
        next_cursor: set by the selector that cuts the page: the next page's cursor, or None when
            the ranked list is exhausted. The response carries the last non-None one.
    """

    candidates: list[Candidate]
    features: pd.DataFrame | None = None
    next_cursor: PageCursor | None = None


class Selector(Protocol):
    """Chooses and orders candidates: top K by light score, author diversity, the page.

    One signature for all: the selector reads what it needs from the query (``page_size``,
    ``cursor``) and, if it keeps feature rows aligned, from ``features``.

    Attributes:
        name: short name (logs).
    """

    name: str

    def enabled(self, query: Query) -> bool:
        """True if this selector runs for ``query``."""
        return True

    def select(self, query: Query, candidates: list[Candidate], features: pd.DataFrame | None) -> SelectorResult:
        """Select from ``candidates`` (``features``: their rows, row i = candidates[i], or None
        after a selector that dropped the frame).

        Raises:
            Exception: any error fails the request.
        """
        ...


@dataclass
class TimelineResult:
    """What one request produced; the input of every side effect and of the HTTP response.

    Attributes:
        query: the hydrated query (user context, arm).
        items: the page, best first (``score`` descending).
        next_cursor: cursor of the next page, or None when the ranked list is exhausted.
        timings_ms: stage name -> wall milliseconds (float, rounded to 1 us), in run order, plus
            "total" (recorded before the side effects that run ``after_total``).
        source_results: one per candidate source that ran (status, count, elapsed).
        filtered: filter name -> candidates it removed (filters that ran).
        counts: retrieved, hydrated, after_filters, heavy_ranked (after the scoring stages),
            selected.
        model_versions: scorer name -> registered version, e.g. {"light_ranker": "3",
            "heavy_ranker": "5"}.
        degraded: stages that failed open (e.g. "feature_hydration" served with NaN features,
            "realtime_features" served with the batch values).
        scoring_paths: scorer name -> path, e.g. {"light_ranker": "in_process", "heavy_ranker":
            "triton_grpc"}; path one of "in_process", a remote backend ("triton_grpc",
            "triton_http", "bentoml") or "in_process_fallback".
        ranked: the candidates after the scoring stages, in the order of ``features``' rows (the
            runner's own list, not a copy; ``items`` are a subset of these objects).
        features: the feature frame after the scoring stages (float64, ``ALL_FEATURES`` columns,
            row i = ``ranked[i]``): the values the last scorer saw, real-time merging included
            (feature logging reads it with ``item_features``). None when the result was built by
            hand without a frame.
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
    ranked: list[Candidate] | None = None
    features: pd.DataFrame | None = None

    def item_features(self) -> np.ndarray:
        """The feature rows of ``items``: float64 ``[len(items), len(ALL_FEATURES)]``, row i =
        ``items[i]``, columns in ``ALL_FEATURES`` order, NaN = missing (a fancy-indexed copy of
        the page's rows only; the frame itself is not copied).

        Items are matched to ``ranked`` by identity (selectors after scoring keep the candidate
        objects, they only drop and re-order them).

        Raises:
            ValueError: no frame (``features`` / ``ranked`` is None), or an item is not one of the
                ``ranked`` candidates (a selector replaced the objects).
        """
        import numpy as np

        if self.features is None or self.ranked is None:
            raise ValueError("this result carries no feature frame (features / ranked is None)")
        row_of = {id(c): i for i, c in enumerate(self.ranked)}
        try:
            rows = [row_of[id(c)] for c in self.items]
        except KeyError:
            raise ValueError("a served item is not one of the scored candidates (a selector after scoring "
                             "returned new Candidate objects): its feature row is unknown") from None
        return self.features.to_numpy(dtype=np.float64, copy=False)[rows]


class SideEffect(Protocol):
    """Acts on a finished request (served-posts record, impression log, metrics). Fail-open: an
    exception is logged and counted in ``hm_mixer_side_effect_failures_total{side_effect}``; the
    response is served anyway.

    Attributes:
        name: short name: the ``side_effect`` metric label.
        after_total: False (default): runs inside the "side_effects" stage, before "total" is
            recorded. True: runs after "side_effects" and "total" are in ``result.timings_ms``, so
            it sees the request's final accounting (request metrics); its own time is in no stage.
    """

    name: str
    after_total: ClassVar[bool] = False

    def enabled(self, query: Query) -> bool:
        """True if this side effect runs for ``query``."""
        return True

    def apply(self, result: TimelineResult) -> None:
        """Act on ``result``.

        Raises:
            Exception: any error; the runner counts it and serves the response (class docstring).
        """
        ...


__all__ = [
    "CandidateHydrator", "CandidateSource", "Fallback", "FeatureHydrator", "Filter", "FilterResult", "QueryHydrator",
    "Scorer", "Selector", "SelectorResult", "SideEffect", "TimelineResult",
]
