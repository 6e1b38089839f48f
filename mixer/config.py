"""Configuration of the mixer service: pydantic models over a YAML file.

The embedded default is ``mixer/mixer.yaml`` (package data). ``load_config(path)`` reads another
file and merges it over the embedded default (keys left out keep the default; mappings merge key by
key, lists are replaced whole); unknown keys are errors (a typo must not be silently ignored).
"""

from __future__ import annotations

import math
import os
import time
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from core.schema import HEADS
from pipelines.graph.config import FanoutSettings
from mixer.admission import OverloadSettings
from mixer.caches import CacheSettings
from mixer.haproxy import FrontDoorSettings
from mixer.quality_factor import QualityFactorSettings
from mixer.redis_health import RedisClientSettings

DEFAULT_CONFIG_NAME = "mixer.yaml"


class ConfigError(ValueError):
    """The mixer configuration is invalid; the message names the key and what to change."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeastSettings(_Strict):
    """Where the online features live (Feast's Redis layout)."""

    project: str = "home_mixer"
    entity_key_serialization_version: int = 3
    # redis_layout reads Feast's hashes directly; feast_sdk goes through store.get_online_features
    hydrator: Literal["redis_layout", "feast_sdk"] = "redis_layout"


class ModelSettings(_Strict):
    """Registered model names in MLflow and the alias to serve."""

    tracking_uri: str | None = None
    light_ranker: str = "light_ranker"
    heavy_ranker: str = "heavy_ranker"
    # the retrieval model of the embedding source; served when registered with the alias
    two_tower: str = "two_tower"
    alias: str = "champion"
    # Poll the registry aliases this often and swap in a newly promoted version (0 = never).
    reload_interval_s: float = Field(5.0, ge=0)


class ScoringSettings(_Strict):
    """Where the rankers run. ``in_process`` (embedded default) scores with the models loaded from
    the registry; the remote backends score on a model server and fall back to in-process scoring of
    the same model version on error or when ``timeout_ms`` passes. A circuit breaker per model
    opens after ``breaker_fail_max`` consecutive failed calls (calls then go in-process at once) and
    lets one probe through after ``breaker_reset_s``; the probe's success closes it.

    ``threads`` is each worker's intra-op thread count for in-process scoring (torch's pool, per
    process, and LightGBM's per call). The default 1 suits one worker per core: with the libraries'
    default (all cores) each worker's idle OpenMP threads spin on the cores the other workers need
    (measured in one process: 40-47 -> 26-27 ms of process CPU per request at the same latency;
    under load on 2 workers the difference was within the machine's noise)."""

    backend: Literal["in_process", "triton_grpc", "triton_http", "bentoml"] = "in_process"
    url: str | None = None  # triton_grpc: host:port; triton_http: host:port; bentoml: http://host:port
    timeout_ms: float = Field(100, gt=0)
    breaker_fail_max: int = Field(5, ge=1)
    breaker_reset_s: float = Field(10.0, gt=0)
    threads: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "ScoringSettings":
        if self.backend != "in_process" and not self.url:
            raise ValueError(f"scoring.url is required for backend {self.backend!r}")
        return self


class LightRankerSettings(_Strict):
    """How the light ranker scores in-process (``models.compiled_light``).

    ``compiled`` compiles the registered LightGBM model with lleaves (LLVM) once per version into
    ``cache_dir`` (null: ``<state>/compiled``; a restart reads it back), checks it against LightGBM
    at load (max |diff| <= 1e-6 on rows on every split threshold plus the last ``check_rows`` rows
    of the feature log) and scores with it; if lleaves is missing, compiling fails or the check
    fails, a warning is logged and LightGBM scores. ``lightgbm`` always scores with LightGBM."""

    backend: Literal["compiled", "lightgbm"] = "compiled"
    cache_dir: str | None = None
    check_rows: int = Field(1000, ge=0)


class HeavyRankerSettings(_Strict):
    """How the heavy ranker scores in-process (``serving.onnx_ranker``).

    ``onnx`` exports the registered ``torch.export`` program to ONNX once per version into
    ``cache_dir`` (null: ``<state>/compiled``; a restart reads it back), checks it against torch at
    load (max |diff| <= 1e-5 on the feature log's last ``check_rows`` rows, or seeded synthetic rows
    when the log is empty, plus rows with each feature missing, all missing and +-inf) and scores it
    with ONNX Runtime (3.3 vs 9.0 ms per 1,000 rows on one thread); if onnxruntime is missing, the
    export fails or the check fails, a warning is logged and torch scores. ``torch`` always scores
    with torch."""

    backend: Literal["onnx", "torch"] = "onnx"
    cache_dir: str | None = None
    check_rows: int = Field(1000, ge=0)


class InNetworkSourceSettings(_Strict):
    max_candidates: int = Field(500, ge=1)
    max_authors: int = Field(100, ge=1)
    posts_per_author: int = Field(20, ge=1)
    timeout_ms: float = Field(50, gt=0)
    # index: the candidate index's author lists; timeline: the pushed home timeline + celebrity pulls
    # (fan-out workers running; fanout.max_celebrity_pulls)
    read: Literal["index", "timeline"] = "index"


class PopularSourceSettings(_Strict):
    max_candidates: int = Field(500, ge=1)
    window: Literal["24h", "7d"] = "7d"
    timeout_ms: float = Field(50, gt=0)


class TagInterestSourceSettings(_Strict):
    max_candidates: int = Field(500, ge=1)
    top_tags: int = Field(5, ge=1)
    timeout_ms: float = Field(50, gt=0)


class TrendingSourceSettings(_Strict):
    enabled: bool = True
    max_candidates: int = Field(200, ge=1)
    timeout_ms: float = Field(50, gt=0)


class CoEngagementSourceSettings(_Strict):
    """``CoEngagementCandidateSource``: neighbours of the user's latest engagements."""

    enabled: bool = True
    max_candidates: int = Field(500, ge=1)
    seed_posts: int = Field(32, ge=1)
    neighbours_per_seed: int = Field(200, ge=1)
    timeout_ms: float = Field(50, gt=0)


class EmbeddingSourceSettings(_Strict):
    """``EmbeddingCandidateSource``: two-tower user vector against the ANN index (needs a registered
    two-tower model, ``models.two_tower``; without one the source stays off).

    ``user_tower`` says where the user vector is computed once per request
    (``UserEmbeddingQueryHydrator``): ``in_process`` (default) runs the registered tower in the
    mixer; ``triton`` asks the Triton model of the same name and version at ``triton_url`` (gRPC
    ``host:port``; ``home-mixer serve triton sync`` exports it) with a ``triton_timeout_ms``
    deadline, and runs the tower in-process on error, on timeout or while the circuit breaker
    (``scoring.breaker_*``) is open, counted in ``hm_mixer_scoring_fallbacks_total{model="two_tower"}``."""

    enabled: bool = True
    max_candidates: int = Field(300, ge=1)
    timeout_ms: float = Field(50, gt=0)
    user_tower: Literal["in_process", "triton"] = "in_process"
    triton_url: str | None = None
    triton_timeout_ms: float = Field(20, gt=0)

    @model_validator(mode="after")
    def _triton_needs_url(self) -> "EmbeddingSourceSettings":
        if self.user_tower == "triton" and not self.triton_url:
            raise ValueError("candidate_sources.embedding.triton_url (gRPC host:port) is required for user_tower: triton")
        return self


class CandidateSourceSettings(_Strict):
    coengagement: CoEngagementSourceSettings = CoEngagementSourceSettings()
    embedding: EmbeddingSourceSettings = EmbeddingSourceSettings()
    in_network: InNetworkSourceSettings = InNetworkSourceSettings()
    popular: PopularSourceSettings = PopularSourceSettings()
    tag_interest: TagInterestSourceSettings = TagInterestSourceSettings()
    trending: TrendingSourceSettings = TrendingSourceSettings()


class ActionSequenceSettings(_Strict):
    """``UserActionSequenceQueryHydrator``: the user's last engagements on the query."""

    enabled: bool = True
    max_length: int = Field(64, ge=1)


class RealtimeSettings(_Strict):
    """Stream-processor features (``mixer/feature_hydrators/realtime.py``)."""

    enabled: bool = True
    # the processor's counts are used only if no stream entry waited longer than this (s, Redis clock)
    max_staleness_s: float = Field(120.0, gt=0)


class RankingSettings(_Strict):
    heavy_ranker_top_k: int = Field(200, ge=1)
    author_diversity_decay: float = Field(0.5, gt=0, le=1)
    author_diversity_floor: float = Field(0.25, ge=0, le=1)


class FilterSettings(_Strict):
    max_post_age_days: float = Field(30, gt=0)
    max_posts_per_author: int = Field(2, ge=1)


class PageSettings(_Strict):
    default_size: int = Field(20, ge=1)
    max_size: int = Field(100, ge=1)

    @model_validator(mode="after")
    def _default_within_max(self) -> "PageSettings":
        if self.default_size > self.max_size:
            raise ValueError(f"page.default_size ({self.default_size}) exceeds page.max_size ({self.max_size})")
        return self


class ServedSettings(_Strict):
    ttl_seconds: int = Field(3600, ge=1)
    max_per_user: int = Field(2000, ge=1)
    impression_stream_maxlen: int = Field(100_000, ge=1)
    exploration_stream_maxlen: int = Field(100_000, ge=1)  # exploring requests' pools (entries)


class FeatureLoggingSettings(_Strict):
    """Feature logging (``mixer/side_effects/feature_log.py``): every served post's feature row, as
    the rankers saw it, to the capped stream ``core.online_layout.SERVED_FEATURES``."""

    enabled: bool = True
    stream_maxlen: int = Field(100_000, ge=1)  # approximate cap (MAXLEN ~), entries


class DriftSampleSettings(_Strict):
    """The production sample of drift monitoring (``mixer/side_effects/drift_sample.py``): a share of
    requests, up to ``per_request`` heavy-ranked candidates each, to the capped stream
    ``core.online_layout.DRIFT_SAMPLE``."""

    enabled: bool = True
    rate: float = Field(0.01, ge=0, le=1)  # share of requests
    per_request: int = Field(20, ge=1)
    stream_maxlen: int = Field(50_000, ge=1)  # approximate cap (MAXLEN ~), entries


class ExplorationSettings(_Strict):
    """An arm's exploration policy (``mixer.selectors.exploration``): the page's slots drawn from
    the top ``pool`` candidates, each served post logged with its propensity.

    ``softmax`` draws by ``exp(score / temperature)`` (Plackett-Luce; ``temperature`` in the
    blended score's units: the demo's scores are weighted sums of head probabilities, ~0.01-1);
    ``epsilon_greedy`` takes the best remaining candidate except with probability ``epsilon`` a
    uniform one.
    """

    policy: Literal["softmax", "epsilon_greedy"] = "softmax"
    pool: int = Field(50, ge=2, le=1000)
    temperature: float = Field(0.1, gt=0)
    epsilon: float = Field(0.1, gt=0, le=1)


# a registered model's reference: a registry alias ("champion", "challenger") or a version ("7")
MODEL_REF_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
HOLDOUT_ARM = "holdout"


class ArmModels(_Strict):
    """The registered rankers an arm serves instead of the served alias (``models.alias``), each a
    registry alias (``challenger``) or version (``7``) of ``models.light_ranker`` /
    ``models.heavy_ranker``; None keeps the served one. Loaded at start-up and followed like the
    served alias (``mixer.model_watcher``)."""

    light_ranker: str | None = Field(None, pattern=MODEL_REF_PATTERN)
    heavy_ranker: str | None = Field(None, pattern=MODEL_REF_PATTERN)


class ArmSourceSettings(_Strict):
    """An arm's candidate-source overrides: a source switched off (``enabled: false``) or given
    another ``max_candidates``; left out, the source runs as ``candidate_sources`` sets it."""

    enabled: bool = True
    max_candidates: int | None = Field(None, ge=1)


class ShadowSettings(_Strict):
    """Shadow scoring (``mixer.side_effects.shadow_scoring``): for a ``share`` of requests a
    challenger heavy ranker scores the candidates the served one scored, off the request path (a
    bounded queue of ``queue_size`` requests, one thread; full: the request is not shadowed and
    is counted). Its scores and ranks go next to the served ones to ``core.online_layout.SHADOW_LOG``
    (capped at ``stream_maxlen``); it never changes what is served."""

    heavy_ranker: str = Field(pattern=MODEL_REF_PATTERN)
    share: float = Field(0.1, gt=0, le=1)
    queue_size: int = Field(64, ge=1)
    stream_maxlen: int = Field(100_000, ge=1)


class HoldoutSettings(_Strict):
    """A holdout: ``share`` of users kept out of every arm (logged as arm ``holdout``) and served
    as arm ``serves`` is (its weights, the served models, no exploration), to measure the
    experiments' sum against a group that saw none of them. Its own ``salt`` keeps the same users
    held out while experiments (and their salts) change."""

    share: float = Field(gt=0, lt=1)
    salt: str = Field(min_length=1)
    serves: str = Field(min_length=1)


class ArmSettings(_Strict):
    """One experiment arm: its share of users, its blender weight per head, the exponent of
    the light score in the blend (``mixer.blenders.WeightedSumBlender``; 0 = weighted sum only)
    and, optionally, its exploration policy (None: the page is the ranked order)."""

    name: str = Field(min_length=1)
    traffic_share: float = Field(ge=0, le=1)
    weights: dict[str, float] = Field(default_factory=dict)
    light_score_exponent: float = Field(0.0, ge=0, le=4)
    exploration: ExplorationSettings | None = None
    # team-draft interleaving (mixer.selectors.interleaving): this arm's users see the two named
    # arms' rankings merged, each post credited to the arm that placed it; the arm has no weights
    interleave: tuple[str, str] | None = None
    models: ArmModels = ArmModels()
    sources: dict[str, ArmSourceSettings] = Field(default_factory=dict)

    @field_validator("sources")
    @classmethod
    def _known_sources(cls, sources: dict[str, "ArmSourceSettings"]) -> dict[str, "ArmSourceSettings"]:
        known = list(CandidateSourceSettings.model_fields)
        unknown = sorted(set(sources) - set(known))
        if unknown:
            raise ValueError(f"unknown candidate sources {unknown}; sources are {known}")
        return sources

    @field_validator("weights")
    @classmethod
    def _known_heads(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(HEADS))
        if unknown:
            raise ValueError(f"unknown heads {unknown}; heads are {list(HEADS)}")
        return weights

    @model_validator(mode="after")
    def _weights_or_interleave(self) -> "ArmSettings":
        if self.interleave is None and not self.weights:
            raise ValueError(f"arm {self.name!r} needs at least one head weight (or `interleave: [arm, arm]`)")
        if self.interleave is not None:
            if self.weights:
                raise ValueError(f"arm {self.name!r} interleaves {list(self.interleave)}: their weights rank, so "
                                 "it takes no weights of its own")
            if self.exploration is not None:
                raise ValueError(f"arm {self.name!r} cannot both interleave and explore")
            if self.interleave[0] == self.interleave[1]:
                raise ValueError(f"arm {self.name!r} interleaves {self.interleave[0]!r} with itself")
        if self.name == HOLDOUT_ARM:
            raise ValueError(f"arm name {HOLDOUT_ARM!r} is reserved for the holdout (experiment.holdout)")
        return self


class ExperimentSettings(_Strict):
    """The running experiment: its ``id`` (logged with every impression; ``home-mixer experiment
    report`` reads by it), the ``salt`` of the user hash, and the arms with their shares."""

    id: str = Field("home-timeline", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    salt: str = Field(min_length=1)
    arms: tuple[ArmSettings, ...] = Field(min_length=1)
    holdout: HoldoutSettings | None = None
    shadow: ShadowSettings | None = None

    @model_validator(mode="after")
    def _shares_sum_to_one(self) -> "ExperimentSettings":
        total = sum(a.traffic_share for a in self.arms)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"experiment.arms traffic_share values sum to {total}, they must sum to 1")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment.arms names must be unique, got {names}")
        by_name = {a.name: a for a in self.arms}
        for a in self.arms:
            for team in a.interleave or ():
                if team not in by_name:
                    raise ValueError(f"arm {a.name!r} interleaves {team!r}, which is not an arm of the experiment "
                                     f"({names})")
                if by_name[team].interleave is not None:
                    raise ValueError(f"arm {a.name!r} interleaves {team!r}, itself an interleaving arm: name two "
                                     "arms with weights")
                if by_name[team].models != a.models:
                    raise ValueError(f"arm {a.name!r} interleaves {team!r}, which serves other models: "
                                     "interleaving merges two blends of one scoring; compare models with "
                                     "A/B arms or experiment.shadow")
        if self.holdout is not None:
            serves = by_name.get(self.holdout.serves)
            if serves is None or serves.interleave is not None:
                raise ValueError(f"experiment.holdout.serves {self.holdout.serves!r} must name an arm with "
                                 f"weights, one of {[a.name for a in self.arms if a.interleave is None]}")
        return self

    @property
    def served_arms(self) -> tuple[ArmSettings, ...]:
        """The arms a request can be assigned: ``arms`` plus, with a holdout, the ``holdout``
        arm: a copy of ``holdout.serves`` with the served models, its default sources, no
        exploration, and the holdout's share."""
        if self.holdout is None:
            return self.arms
        serves = next(a for a in self.arms if a.name == self.holdout.serves)
        held = ArmSettings(name="placeholder", traffic_share=self.holdout.share, weights=serves.weights,
                           light_score_exponent=serves.light_score_exponent)
        return (*self.arms, held.model_copy(update={"name": HOLDOUT_ARM}))

    def assignment_shares(self) -> dict[str, float]:
        """Arm -> the share of users it gets: ``traffic_share``, scaled by ``1 - holdout.share``
        with a holdout, which gets its own share (sums to 1)."""
        kept = 1.0 - (self.holdout.share if self.holdout else 0.0)
        shares = {a.name: a.traffic_share * kept for a in self.arms}
        if self.holdout is not None:
            shares[HOLDOUT_ARM] = self.holdout.share
        return shares

    def model_refs(self, default: str) -> dict[str, set[str]]:
        """``{"light_ranker": refs, "heavy_ranker": refs}``: every registry reference the arms and
        the shadow serve, ``default`` (the served alias) included."""
        refs = {"light_ranker": {default}, "heavy_ranker": {default}}
        for a in self.arms:
            refs["light_ranker"].add(a.models.light_ranker or default)
            refs["heavy_ranker"].add(a.models.heavy_ranker or default)
        if self.shadow is not None:
            refs["heavy_ranker"].add(self.shadow.heavy_ranker)
        return refs


class GcSettings(_Strict):
    """The worker's Python garbage collector (set once per process, at start).

    ``freeze_at_start`` moves everything loaded at start (models, caches, the config) to the
    permanent generation (``gc.freeze``), so later collections do not scan it. ``thresholds``
    (``gc.set_threshold``: gen0 allocations, gen1 and gen2 collection counts; null = Python's 700,
    10, 10) sets how often collections run. Measured on the demo's state, 300 in-process requests
    after the warm-up: Python's defaults spent 4.8-6.2 ms per request in the collector with gen2
    pauses of 360-490 ms; after a freeze, 1.2-1.4 ms per request and 13 gen2 collections of up to
    12 ms; with (20000, 50, 100) as well, one gen0 collection in the 300 requests. The pipeline
    makes 4 cyclic objects per request (1,200 unreachable after 300 requests with the collector
    off): everything else is freed by reference counting, so rare collections do not grow memory."""

    freeze_at_start: bool = True
    thresholds: tuple[int, int, int] | None = (20_000, 50, 100)

    @model_validator(mode="after")
    def _positive(self) -> "GcSettings":
        if self.thresholds is not None and min(self.thresholds) < 1:
            raise ValueError(f"gc.thresholds must be three integers >= 1 (or null), got {list(self.thresholds)}")
        return self


class ClockSettings(_Strict):
    """The mixer's request time.

    ``now: "real"`` serves wall-clock time; an ISO-8601 instant serves "as of" that instant. With an
    instant and ``since`` (an ISO-8601 wall-clock instant) the clock runs: it reads ``now`` at wall
    time ``since`` and advances with the wall clock, ``now + (wall - since)``, so a replay stamped
    with the same clock (``running_clock``) is live for the mixer while the batch data stays as of
    ``now`` (the demo's real-time stage).
    """

    now: str = "real"
    since: str | None = None

    @field_validator("now")
    @classmethod
    def _real_or_instant(cls, value: str) -> str:
        if value != "real":
            _parse_instant(value)
        return value

    @model_validator(mode="after")
    def _since_needs_an_instant(self) -> "ClockSettings":
        if self.since is not None:
            if self.now == "real":
                raise ValueError("clock.since needs clock.now to be an instant (with now: real the clock already runs)")
            _parse_instant(self.since, "clock.since")
        return self

    def now_s(self) -> float:
        """The request time in epoch seconds (UTC)."""
        if self.now == "real":
            return datetime.now(timezone.utc).timestamp()
        t = _parse_instant(self.now).timestamp()
        if self.since is None:
            return t
        return t + datetime.now(timezone.utc).timestamp() - _parse_instant(self.since, "clock.since").timestamp()


def running_clock(now: datetime, since: datetime) -> Callable[[], float]:
    """Epoch seconds of the clock ``ClockSettings(now, since)``: ``now + (wall - since)``; both
    instants timezone-aware. For replays and processors that must share the mixer's running clock."""
    offset = now.timestamp() - since.timestamp()
    return lambda: time.time() + offset


def _parse_instant(value: str, key: str = "clock.now") -> datetime:
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        real = " or 'real'" if key == "clock.now" else ""
        raise ValueError(f"{key} must be an ISO-8601 instant like 2022-05-04T16:00:00Z{real}, got {value!r}") from None
    if ts.tzinfo is None:
        raise ValueError(f"{key} {value!r} has no time zone; add 'Z' or an offset")
    return ts


class AuthSettings(_Strict):
    """Bearer-token authentication of the API (``mixer/auth.py``).

    Accepted: ``tokens`` plus ``$HOME_MIXER_API_TOKENS`` (comma-separated), merged, so a key rotates
    by adding the new one before removing the old; with neither, the state folder's generated
    ``run/mixer-api-token``. Tokens are ``SecretStr``: a dumped or printed config shows ``**********``.
    """

    enabled: bool = True            # false: no authentication at all (behind a gateway that does it)
    tokens: tuple[SecretStr, ...] = ()
    protect_metrics: bool = False   # true: /metrics needs a token too (the scraper must send one)

    @field_validator("tokens")
    @classmethod
    def _usable(cls, tokens: tuple[SecretStr, ...]) -> tuple[SecretStr, ...]:
        from mixer.auth import AuthConfigError, check_token

        for t in tokens:
            try:
                check_token(t.get_secret_value(), "auth.tokens")
            except AuthConfigError as e:
                raise ValueError(str(e)) from None
        return tokens


class MixerConfig(_Strict):
    """The whole mixer configuration (see ``mixer/mixer.yaml`` for the documented defaults)."""

    # a validation error must not echo its input: it may hold an auth token
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    redis_url: str | None = None
    auth: AuthSettings = AuthSettings()
    feast: FeastSettings = FeastSettings()
    models: ModelSettings = ModelSettings()
    scoring: ScoringSettings = ScoringSettings()
    light_ranker: LightRankerSettings = LightRankerSettings()
    heavy_ranker: HeavyRankerSettings = HeavyRankerSettings()
    candidate_sources: CandidateSourceSettings = CandidateSourceSettings()
    action_sequence: ActionSequenceSettings = ActionSequenceSettings()
    ranking: RankingSettings = RankingSettings()
    filters: FilterSettings = FilterSettings()
    page: PageSettings = PageSettings()
    served: ServedSettings = ServedSettings()
    feature_logging: FeatureLoggingSettings = FeatureLoggingSettings()
    drift_sample: DriftSampleSettings = DriftSampleSettings()
    experiment: ExperimentSettings
    clock: ClockSettings = ClockSettings()
    gc: GcSettings = GcSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    redis: RedisClientSettings = RedisClientSettings()  # retry / backoff, outage probing, write buffer
    caches: CacheSettings = CacheSettings()  # shared reads by store version; last-known-good values
    overload: OverloadSettings = OverloadSettings()
    quality_factor: QualityFactorSettings = QualityFactorSettings()
    fanout: FanoutSettings = FanoutSettings()  # the social graph and fan-out (pipelines/graph/fanout.yaml)
    front_door: FrontDoorSettings = FrontDoorSettings()  # HAProxy in front of replicas (mixer/haproxy.py)
    source_pool_workers: int = Field(8, ge=1)
    # poll the config file this often and serve a changed `experiment` section without a restart (0 = off)
    config_reload_interval_s: float = Field(5.0, ge=0)

    @model_validator(mode="after")
    def _front_door_within_bound(self) -> "MixerConfig":
        # HAProxy must never send a replica more than it admits: it would refuse (503) what could queue
        self.front_door.maxconn(self.overload.max_in_flight, self.overload.max_concurrent)
        return self

    def resolved_redis_url(self) -> str:
        """The online store's address: ``redis_url``, else ``$HOME_MIXER_REDIS_URL``, else the one
        running for the state folder (the HA set's ``redis+sentinel://`` address, else the single
        Redis's URL); ``core.online_store.connect`` opens either.

        Raises:
            ConfigError: none of the three is available, or the address is malformed (the
                message says what to write).
        """
        from core.online_store import OnlineStoreAddressError, parse_address

        address = self.redis_url or os.environ.get("HOME_MIXER_REDIS_URL")
        if not address:
            from core.services import online_store_address
            from core.state import StateDir

            address = online_store_address(StateDir.from_env())
        if not address:
            raise ConfigError(
                "no Redis for the mixer: set redis_url in the config, export HOME_MIXER_REDIS_URL, "
                "or start one with `home-mixer services start [--ha]`."
            )
        try:
            parse_address(address)
        except OnlineStoreAddressError as e:
            raise ConfigError(f"redis_url: {e}") from None
        return address

    def resolved_tracking_uri(self) -> str:
        """``models.tracking_uri``, else the state folder's MLflow (``MLFLOW_TRACKING_URI`` wins there)."""
        if self.models.tracking_uri:
            return self.models.tracking_uri
        from core.state import StateDir

        return StateDir.from_env().mlflow_tracking_uri

    def with_overrides(self, **changes) -> "MixerConfig":
        """A copy with top-level fields replaced, validated again (e.g. ``redis_url=...``)."""
        return MixerConfig.model_validate({**self.model_dump(), **changes})


def parse_config(data: dict) -> MixerConfig:
    """Validate a config mapping (as read from YAML).

    Raises:
        ConfigError: naming each invalid key path and why.
    """
    try:
        return MixerConfig.model_validate(data or {})
    except ValidationError as e:
        # a check across sections (a model validator) has no key path: its message names the keys
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" if err["loc"] else err["msg"]
                             for err in e.errors())
        raise ConfigError(f"invalid mixer config: {problems}") from None


def default_config_text() -> str:
    """The embedded ``mixer/mixer.yaml``."""
    return resources.files("mixer").joinpath(DEFAULT_CONFIG_NAME).read_text()


def _read_yaml(text: str, where: str) -> dict:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping at top level, got {type(data).__name__}")
    return data or {}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None) -> MixerConfig:
    """Load a YAML config file merged over the embedded default; ``None`` loads the default alone.

    Raises:
        ConfigError: the file is missing, is not YAML, or fails validation.
    """
    data = _read_yaml(default_config_text(), "embedded mixer.yaml")
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"mixer config {p} does not exist; pass an existing YAML file or omit --config")
        data = _merge(data, _read_yaml(p.read_text(), str(p)))
    return parse_config(data)
