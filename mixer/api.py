"""HTTP API of the mixer: ``POST /v1/home-timeline``, ``GET /metrics``, ``GET /healthz``, ``/docs``.

Run: ``python -m mixer.api --config PATH --port N`` (uvicorn on 127.0.0.1 by default).
Start-up opens Redis, loads the light and heavy rankers from the MLflow registry by alias, builds
the pipeline, then sets the collector's thresholds and runs ``gc.collect(); gc.freeze()``
(``gc`` in the config): the long-lived start-up objects (models, Feast and MLflow modules) leave the
young generations, so request-time collections scan only request garbage (measured here: p99 ~118
ms -> ~11 ms), and collections run rarely (``mixer.config.GcSettings``).
"""


# prometheus_client before anything that imports feast: feast sets PROMETHEUS_MULTIPROC_DIR on
# import, which would make metrics file-backed (popped again after the feast import below).
import prometheus_client  # noqa: I001
# (no `from __future__ import annotations` here: FastAPI must resolve the request model built in create_app)

import argparse
import dataclasses
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import redis
from fastapi import Depends, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field, create_model

from core import METRICS_DIR_ENV, claim_prometheus_env, online_layout as keys
from core.schema import HOME_SURFACE, KNOWN_SURFACES
from mixer.admission import InFlightLimitMiddleware
from mixer.quality_factor import LinearLatencyQualityFactor
from mixer.auth import TokenVerifier, accepted_tokens, bearer_dependency, scope_token
from mixer.config import MixerConfig, load_config
from mixer.metrics import MixerMetrics
from mixer.model_watcher import ModelAliasWatcher
from mixer.pipeline import HomeTimelinePipeline, Resilience, ServedModels, TimelineResult, build_pipeline, finite
from mixer.redis_health import StoreWatcher, redis_client
from mixer.scorers import RankerHandle
from mixer.selectors import CursorError, PageCursor

log = logging.getLogger(__name__)

TIMELINE_PATH = "/v1/home-timeline"
WORKER_HEADER = "X-Mixer-Worker"  # the pid of the worker process that answered


class TimelineItem(BaseModel):
    """One ranked post."""

    post_id: int
    author_id: int
    score: float | None = Field(description="blended score after author diversity (higher is better)")
    heads: dict[str, float | None] = Field(description="heavy ranker probability per engagement head")
    light_score: float | None
    source: str = Field(description="candidate source (the pipeline declaration's names: in_network, popular, "
                                    "tag_interest, coengagement, embedding...)")
    source_detail: str = Field("", description="how the source found the post, when it has several ways: "
                                              "in_network with the timeline read: pushed (fanned out into the "
                                              "home timeline) or pulled (a followed celebrity's post, merged at "
                                              "read); empty otherwise")
    in_network: bool
    team: str = Field("", description="an interleaving arm's team arm that placed the post (empty otherwise)")
    propensity: float = Field(1.0, description="the probability this post had of its slot given the slots above it: "
                                               "1 unless the arm explores (a feed service that logs its own "
                                               "impressions keeps it for off-policy evaluation)")


class TimelineResponse(BaseModel):
    """One page of a home timeline."""

    request_id: str = Field(description="this page's id, logged with every served post (join engagements on it)")
    user_id: int
    surface: int = Field(description="the surface this page was ranked for (the request's, or the default)")
    arm: str
    items: list[TimelineItem]
    next_cursor: str | None = Field(description="send back as `cursor` for the next page; null when exhausted")
    model_versions: dict[str, str]
    scoring_paths: dict[str, str] = Field(
        description="per ranker: in_process, triton_grpc, triton_http, bentoml, or in_process_fallback "
                    "(the model server failed or missed its deadline)")
    timings_ms: dict[str, float]
    degraded: list[str] = Field(
        default_factory=list,
        description="stages that failed open for this page, in stage order (empty: a normal answer): "
                    "query_hydration (user context last-known or unknown), candidate_sources / "
                    "candidate_hydration / feature_hydration (served from the last-known-good caches, Redis "
                    "unreachable), realtime_features (batch counts: Redis unreachable or the stream processor "
                    "stopped), side_effects (served-posts / impression writes buffered until Redis is back)")
    quality_factor: float = Field(
        1.0, description="share of the full work this page got, in (0, 1]: under load the candidate source "
                         "limits and the heavy ranker's top K are scaled by it (1: full quality)")


@dataclass
class MixerResources:
    """What start-up opens and shutdown closes.

    ``resilience`` (caches, Redis health, stream liveness, write buffer) and ``store_watcher`` (its
    background thread) belong to this process: nothing is global, and ``close`` flushes what the
    write buffer still holds when Redis answers.
    """

    client: redis.Redis
    executor: ThreadPoolExecutor
    pipeline: HomeTimelinePipeline
    watcher: ModelAliasWatcher | None = None
    backend: object | None = None  # the model-server client, closed at shutdown
    resilience: Resilience = field(default_factory=Resilience)
    store_watcher: StoreWatcher | None = None
    user_tower: object | None = None  # the Triton user-tower client (user_tower: triton), closed at shutdown
    config_watcher: object | None = None  # mixer.config_watcher.ExperimentConfigWatcher (started with a file)

    def close(self) -> None:
        """Stop the alias and store watchers, flush buffered writes (if Redis answers), close the
        model-server client, the source pool and Redis."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.config_watcher is not None:
            self.config_watcher.stop()
        if self.store_watcher is not None:
            self.store_watcher.stop()
        writes = self.resilience.writes
        if writes is not None and writes.pending():
            writes.flush()
            if writes.pending():
                log.warning("shutdown with %d side-effect writes still buffered (Redis unreachable): lost",
                            len(writes))
        if self.resilience.shadow is not None:
            self.resilience.shadow.close()  # before Redis closes: what it scored is written
        for remote in (self.backend, self.user_tower):
            if remote is not None:
                remote.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()


SURFACE_DESCRIPTION = (
    f"the product surface the timeline is for (KuaiRand's `tab` id; request context, like the product "
    f"/ client context of Twitter's home-mixer). Default {HOME_SURFACE}, the home feed. Surfaces "
    f"{list(KNOWN_SURFACES)} have their own ranking features; any other integer >= 0 is accepted and "
    f"ranked as 'other'. A JSON integer: true/false, strings and fractions are rejected (422).")


MAX_USER_ID = 2**63 - 1  # ids are int64 in the online store and the logs
MAX_CURSOR_CHARS = 65_536  # a cursor holds at most MAX_SERVED post ids (~11 KB for KuaiRand's)


class ErrorResponse(BaseModel):
    """An error (400, 401, 403, 503): ``message`` says what went wrong and what to do."""

    message: str


class ValidationErrorResponse(BaseModel):
    """An invalid request (422): one ``detail`` entry per bad field; ``message`` names them all."""

    detail: list[dict[str, Any]]
    message: str


_BEARER_CHALLENGE = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "headers": _BEARER_CHALLENGE,
          "description": "no bearer token: send `Authorization: Bearer <token>`"},
    403: {"model": ErrorResponse, "description": "the bearer token is not one this mixer accepts"},
}
# OpenAPI link: the next page is the same request with `cursor` = this page's `next_cursor`
NEXT_PAGE_LINK = {"NextPage": {
    "operationId": "homeTimeline",
    "description": "the next page of the same user's timeline",
    "requestBody": {"user_id": "$request.body#/user_id", "cursor": "$response.body#/next_cursor"},
}}


def _exact_integer_bounds(openapi: Callable[[], dict], model: type[BaseModel]) -> Callable[[], dict]:
    """``app.openapi`` with ``model``'s integer bounds as pydantic states them: FastAPI's OpenAPI
    models hold bounds as floats, so ``2**63 - 1`` would read 9.223372036854776e18 (= 2**63)."""
    exact = model.model_json_schema()["properties"]

    def patched() -> dict:
        schema = openapi()  # FastAPI caches it on the app: patching once patches every call
        props = schema.get("components", {}).get("schemas", {}).get(model.__name__, {}).get("properties", {})
        for name, prop in props.items():
            for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                if prop.get("type") == "integer" and key in exact.get(name, {}):
                    prop[key] = exact[name][key]
        return schema

    return patched


def _auth_dependencies(config: MixerConfig, api_tokens: tuple[str, ...] | None) -> tuple[list, TokenVerifier | None]:
    """``([Depends(bearer check)], its verifier)`` for the protected routes; ``([], None)`` when
    ``auth.enabled`` is false.

    Raises:
        mixer.auth.AuthConfigError: see ``mixer.auth.accepted_tokens``.
    """
    if not config.auth.enabled:
        log.warning("AUTHENTICATION IS OFF (auth.enabled: false): anyone who reaches this port gets "
                    "timelines; only run so behind a gateway that authenticates")
        return [], None
    tokens = api_tokens if api_tokens is not None else accepted_tokens(config.auth)
    return [Depends(bearer_dependency(tokens))], TokenVerifier(tokens)


def _request_model(config: MixerConfig) -> type[BaseModel]:
    page = config.page
    return create_model(
        "TimelineRequest",
        __config__=ConfigDict(extra="forbid"),
        # strict: a JSON bool or string is not an id or a size (422, not user 0)
        user_id=(int, Field(ge=0, le=MAX_USER_ID, strict=True, description="the viewer's user id (int64, >= 0)")),
        limit=(int, Field(page.default_size, ge=1, le=page.max_size, strict=True, description="posts per page")),
        cursor=(str | None, Field(None, max_length=MAX_CURSOR_CHARS,
                                  description="next_cursor of the previous page; null for the first")),
        surface=(int, Field(HOME_SURFACE, ge=0, strict=True, description=SURFACE_DESCRIPTION)),
    )


def _validation_message(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)


def _feature_hydrator(config: MixerConfig, client: redis.Redis, resilience: Resilience = Resilience()):
    from core.online_layout import FeastRedisLayout
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator, FeastSdkFeatureHydrator

    claim_prometheus_env()  # feast was imported above
    if config.feast.hydrator == "redis_layout":
        return FeastLayoutFeatureHydrator(client, FeastRedisLayout(config.feast.project,
                                                                   config.feast.entity_key_serialization_version),
                                          caches=resilience.caches, health=resilience.health)
    from feature_repo.store import open_store
    from core.state import StateDir

    return FeastSdkFeatureHydrator(open_store(StateDir.from_env(), config.resolved_redis_url()))


def _scoring_backend(config: MixerConfig):
    """The model-server client of ``scoring.backend`` (None for in-process); one per mixer."""
    if config.scoring.backend == "in_process":
        return None
    from mixer.scorers.remote import make_backend

    return make_backend(config.scoring.backend, config.scoring.url)


def _load_ranker(config: MixerConfig, role: str, ref: str, metrics: MixerMetrics, backend=None,
                 client: redis.Redis | None = None) -> RankerHandle:
    """One ranker (``role`` "light" or "heavy") at the version ``ref`` names (an alias or a
    version), warmed up, wrapped for ``backend`` (None: in-process); a light ranker compiled per
    ``light_ranker.backend``, a heavy ranker in ONNX Runtime per ``heavy_ranker.backend`` (their load
    checks read the feature log through ``client``)."""
    from mixer.scorers.light_backend import light_ranker_backend
    from models.registry import load_ranker_version, resolve_model_ref

    uri, m = config.resolved_tracking_uri(), config.models
    name = m.light_ranker if role == "light" else m.heavy_ranker
    version = resolve_model_ref(name, ref, uri)
    handle = dataclasses.replace(load_ranker_version(name, version, uri, alias="" if ref.isdigit() else ref),
                                 num_threads=config.scoring.threads)
    if role == "light":
        handle = light_ranker_backend(handle, config.light_ranker, client)
    else:
        from mixer.scorers.heavy_backend import heavy_ranker_backend

        def program():  # only on a cache miss: the export's input, a second download of the version
            return load_ranker_version(name, version, uri, with_program=True).program

        handle = heavy_ranker_backend(handle, config.heavy_ranker, program, client, config.scoring.threads)
    _warm_up(handle)  # also the fallback of a remote backend: it must not be cold either
    if backend is None:
        return handle
    from mixer.scorers.remote import RemoteRankerHandle

    scoring = config.scoring

    def on_fallback(model: str, path: str, reason: str) -> None:
        metrics.scoring_fallbacks.labels(model=model, backend=path, reason=reason).inc()

    backend.circuits.configure(scoring.breaker_fail_max, scoring.breaker_reset_s, metrics.set_circuit_state)
    return RemoteRankerHandle(handle, backend, scoring.backend, scoring.timeout_ms / 1000.0, on_fallback)


def _load_rankers(config: MixerConfig, metrics: MixerMetrics, backend=None,
                  client: redis.Redis | None = None) -> tuple[RankerHandle, RankerHandle]:
    """Both rankers at the served alias's versions (``_load_ranker``)."""
    alias = config.models.alias
    return (_load_ranker(config, "light", alias, metrics, backend, client),
            _load_ranker(config, "heavy", alias, metrics, backend, client))


def _load_experiment_rankers(config: MixerConfig, metrics: MixerMetrics, backend=None,
                             client: redis.Redis | None = None) -> tuple[dict, dict, RankerHandle | None]:
    """The rankers the experiment names besides the served ones: (arm -> light ranker, arm ->
    heavy ranker, the shadow challenger or None); one load per distinct reference."""
    loaded: dict[tuple[str, str], RankerHandle] = {}

    def get(role: str, ref: str) -> RankerHandle:
        if (role, ref) not in loaded:
            loaded[(role, ref)] = _load_ranker(config, role, ref, metrics, backend, client)
        return loaded[(role, ref)]

    exp = config.experiment
    light = {a.name: get("light", a.models.light_ranker) for a in exp.arms if a.models.light_ranker}
    heavy = {a.name: get("heavy", a.models.heavy_ranker) for a in exp.arms if a.models.heavy_ranker}
    shadow = get("heavy", exp.shadow.heavy_ranker) if exp.shadow is not None else None
    return light, heavy, shadow


def _load_models(config: MixerConfig, metrics: MixerMetrics, backend=None, client: redis.Redis | None = None,
                 user_tower=None) -> ServedModels:
    """Every model the config serves: the served rankers, the two-tower, the arms' own rankers and
    the shadow challenger (``ServedModels``; the model watcher's ``load``)."""
    light, heavy = _load_rankers(config, metrics, backend, client)
    retrieval = _load_retrieval(config, metrics, user_tower)
    return ServedModels(light, heavy, retrieval, *_load_experiment_rankers(config, metrics, backend, client))


def _user_tower_backend(config: MixerConfig):
    """The Triton user-tower client of ``candidate_sources.embedding.user_tower: triton`` (None for
    in-process, or when the embedding source is off); one per mixer."""
    emb = config.candidate_sources.embedding
    if not emb.enabled or emb.user_tower == "in_process":
        return None
    from mixer.query_hydrators.remote_user_tower import TritonUserTower
    from mixer.scorers.remote import CircuitBreakers

    circuits = CircuitBreakers("triton_grpc", config.scoring.breaker_fail_max, config.scoring.breaker_reset_s)
    return TritonUserTower(emb.triton_url, config.models.two_tower, emb.triton_timeout_ms / 1000.0, circuits)


def _load_retrieval(config: MixerConfig, metrics: MixerMetrics | None = None, user_tower=None):
    """The two-tower model at the alias (``models.registry.load_two_tower``), or None when the
    embedding source is off or no two-tower model is registered with the alias (logged: the mixer
    serves without learned retrieval until one is). With ``user_tower`` (``_user_tower_backend``)
    its user tower runs on Triton, in-process on failure (counted in ``metrics``)."""
    from models.registry import RankerNotFoundError, load_two_tower

    if not config.candidate_sources.embedding.enabled:
        return None
    m = config.models
    try:
        handle = load_two_tower(config.resolved_tracking_uri(), alias=m.alias, name=m.two_tower)
    except RankerNotFoundError as e:
        log.warning("no two-tower model to serve, the embedding source is off: %s", e)
        return None
    handle.retrieve([[]], 10)  # the first forward allocates (~0.1 s): not on a request's deadline
    if user_tower is None:
        return handle

    def on_fallback(model: str, path: str, reason: str) -> None:
        if metrics is not None:
            metrics.scoring_fallbacks.labels(model=model, backend=path, reason=reason).inc()

    if metrics is not None:
        user_tower.circuits.configure(config.scoring.breaker_fail_max, config.scoring.breaker_reset_s,
                                      metrics.set_circuit_state)
    return user_tower.wrap(handle, on_fallback)


def _alias_versions(config: MixerConfig) -> dict[str, int]:
    """The versions every model reference of ``config`` points at now, keyed as
    ``RankerSet.model_versions`` (the model watcher compares them)."""
    from models.registry import RankerNotFoundError, alias_version, resolve_model_ref

    uri, m = config.resolved_tracking_uri(), config.models
    versions = {"light_ranker": alias_version(m.light_ranker, m.alias, uri),
                "heavy_ranker": alias_version(m.heavy_ranker, m.alias, uri)}
    exp = config.experiment
    for a in exp.arms:
        if a.models.light_ranker:
            versions[f"light_ranker:{a.name}"] = resolve_model_ref(m.light_ranker, a.models.light_ranker, uri)
        if a.models.heavy_ranker:
            versions[f"heavy_ranker:{a.name}"] = resolve_model_ref(m.heavy_ranker, a.models.heavy_ranker, uri)
    if exp.shadow is not None:
        versions["heavy_ranker:shadow"] = resolve_model_ref(m.heavy_ranker, exp.shadow.heavy_ranker, uri)
    if config.candidate_sources.embedding.enabled:
        try:
            versions["two_tower"] = alias_version(m.two_tower, m.alias, uri)
        except RankerNotFoundError:  # none registered yet: nothing to swap in
            pass
    return versions


def _after_swap(config: MixerConfig) -> None:
    """After a model or experiment swap: collect the old models' reference cycles now (with the
    raised ``gc.thresholds`` a full collection may be hours away, a frozen object is never
    collected, and a torch module's cycles hold its weights), then freeze the new ones as start-up
    froze the first (``gc.freeze_at_start``). One full collection on the watcher's thread, once per
    swap (the swap's load already took seconds)."""
    gc.unfreeze()
    gc.collect()
    if config.gc.freeze_at_start:
        gc.freeze()


def _warm_up(*handles: RankerHandle) -> None:
    """One prediction per model on two all-NaN rows: the first call of a torch.export graph or a
    LightGBM booster allocates and compiles (~0.25 s measured), which must not land on a request."""
    import numpy as np
    import pandas as pd

    for h in handles:
        h.predict(pd.DataFrame(np.nan, index=range(2), columns=list(h.feature_names)))


# ``open_resources(retrieval=...)``: load the registered two-tower model (the default)
LOAD_RETRIEVAL = "load"


def open_resources(config: MixerConfig, metrics: MixerMetrics,
                   rankers: tuple[RankerHandle, RankerHandle] | None = None,
                   feature_hydrator=None, retrieval=LOAD_RETRIEVAL,
                   config_path: str | Path | None = None) -> MixerResources:
    """Open Redis, load models (unless ``rankers`` is given), build the pipeline and what serves it
    through Redis faults (``open_resilience``).

    ``retrieval``: the embedding source's two-tower handle; by default the one registered with the
    alias (None when there is none), None to serve without it. ``config_path``: the file ``config``
    was read from; its ``experiment`` section is then followed (``mixer.config_watcher``).

    Raises:
        ConfigError: no Redis configured. redis.RedisError: Redis does not answer (at start-up
            nothing is cached yet, so there is nothing to serve without it).
        RuntimeError / MLflow errors: the registered models or their alias cannot be loaded.
    """
    import torch

    torch.set_num_threads(config.scoring.threads)  # per process: this worker's share of the cores
    url = config.resolved_redis_url()
    client = redis_client(url, config.redis)
    backend = user_tower = None
    try:
        client.ping()
        resilience = open_resilience(config, client, metrics)
        if rankers is None:
            backend = _scoring_backend(config)
            light, heavy = _load_rankers(config, metrics, backend, client)
            by_arm_light, by_arm_heavy, shadow_heavy = _load_experiment_rankers(config, metrics, backend, client)
        else:
            light, heavy = rankers
            _warm_up(light, heavy)
            by_arm_light, by_arm_heavy, shadow_heavy = {}, {}, None
        if isinstance(retrieval, str) and retrieval == LOAD_RETRIEVAL:
            user_tower = _user_tower_backend(config)
            retrieval = _load_retrieval(config, metrics, user_tower)
        hydrator = feature_hydrator or _feature_hydrator(config, client, resilience)
        executor = ThreadPoolExecutor(max_workers=config.source_pool_workers, thread_name_prefix="hm-source")
        pipeline = build_pipeline(config, client=client, light=light, heavy=heavy, feature_hydrator=hydrator,
                                  executor=executor, metrics=metrics, resilience=resilience, retrieval=retrieval,
                                  light_by_arm=by_arm_light, heavy_by_arm=by_arm_heavy, shadow_heavy=shadow_heavy)
        store_watcher = StoreWatcher(client, resilience.caches, resilience.health,
                                     version_check_s=config.caches.version_check_s, probe_s=config.redis.probe_s,
                                     flush=resilience.writes.flush, pending=resilience.writes.pending).start()
    except BaseException:
        client.close()
        for remote in (backend, user_tower):
            if remote is not None:
                remote.close()
        raise
    watcher = None
    if rankers is None and config.models.reload_interval_s > 0:
        # the pipeline's config: a reloaded experiment's arm models and shadow are followed too
        watcher = ModelAliasWatcher(pipeline, lambda: _alias_versions(pipeline.config),
                                    lambda: _load_models(pipeline.config, metrics, backend, client, user_tower),
                                    config.models.reload_interval_s, metrics,
                                    after_swap=lambda: _after_swap(config)).start()
    config_watcher = None
    if config_path is not None and rankers is None and config.config_reload_interval_s > 0:
        from mixer.config_watcher import ExperimentConfigWatcher
        from mixer.pipeline import declaration

        config_watcher = ExperimentConfigWatcher(
            config_path, pipeline, lambda cfg: _load_experiment_rankers(cfg, metrics, backend, client),
            lambda cfg: declaration(cfg, client=client, feature_hydrator=hydrator, metrics=metrics,
                                    resilience=resilience),
            config.config_reload_interval_s,
            lambda outcome: metrics.config_reloads.labels(outcome=outcome).inc(),
            after_swap=lambda: _after_swap(config)).start()
    return MixerResources(client=client, executor=executor, pipeline=pipeline, watcher=watcher, backend=backend,
                          resilience=resilience, store_watcher=store_watcher, user_tower=user_tower,
                          config_watcher=config_watcher)


def open_resilience(config: MixerConfig, client: redis.Redis, metrics: MixerMetrics) -> Resilience:
    """The caches, Redis health, stream liveness and write buffer of one mixer process, counted in
    ``metrics`` (``hm_mixer_cache_requests_total``, ``..._side_effect_buffer_*``, ``..._redis_outages_total``)."""
    from core.online_store import has_replica_reads
    from mixer.caches import MixerCaches
    from mixer.feature_hydrators.realtime import StreamLiveness
    from mixer.redis_health import RedisHealth
    from mixer.side_effects.write_buffer import RedisWriteBuffer

    def on_lookup(cache: str, result: str, n: int) -> None:
        metrics.cache_requests.labels(cache=cache, result=result).inc(n)

    health = RedisHealth(on_down=metrics.redis_outages.inc)
    # With Sentinel, reads go on from a replica while the primary is gone: the writes get their own
    # health (the primary's), so a buffered write does not make the reads fail fast.
    ha = has_replica_reads(client)
    write_health = RedisHealth(on_down=metrics.redis_primary_outages.inc, name="the Redis primary") if ha else health
    writes = RedisWriteBuffer(
        client, write_health, max_writes=config.redis.buffer_max_writes,
        on_drop=lambda name, n: metrics.side_effect_buffer_dropped.labels(side_effect=name).inc(n),
        on_flush=lambda name, n: metrics.side_effect_buffer_flushed.labels(side_effect=name).inc(n),
        replica_acks=config.redis.replica_acks if ha else 0, ack_timeout_ms=config.redis.replica_ack_timeout_ms,
        ack_pause_s=config.redis.replica_ack_pause_s,
        on_unreplicated=lambda name, n: metrics.side_effect_unreplicated.labels(side_effect=name).inc(n))
    from mixer.side_effects import ShadowRunner

    # always there (its thread starts on the first shadowed request): a reloaded experiment may turn shadowing on
    shadow = ShadowRunner(config.experiment.shadow.queue_size if config.experiment.shadow else 64,
                          lambda outcome: metrics.shadow_requests.labels(outcome=outcome).inc())
    return Resilience(caches=MixerCaches(config.caches, on_lookup), health=health, liveness=StreamLiveness(),
                      writes=writes, shadow=shadow)


def _response(result: TimelineResult) -> dict:
    return {
        "quality_factor": result.query.quality_factor,
        "request_id": result.query.request_id,
        "user_id": result.query.user_id,
        "surface": result.query.surface,
        "arm": result.query.arm or "",
        "items": [{
            "post_id": c.post_id, "author_id": c.author_id, "score": finite(c.score),
            "heads": {h: finite(p) for h, p in c.heads.items()}, "light_score": finite(c.light_score),
            "source": c.source, "source_detail": c.source_detail, "in_network": c.in_network,
            "propensity": c.propensity, "team": c.team,
        } for c in result.items],
        "next_cursor": result.next_cursor.encode() if result.next_cursor else None,
        "model_versions": result.model_versions,
        "scoring_paths": result.scoring_paths,
        "timings_ms": result.timings_ms,
        "degraded": list(result.degraded),
    }


def create_app(config: MixerConfig, *, rankers: tuple[RankerHandle, RankerHandle] | None = None,
               feature_hydrator=None, multiprocess_dir: str | None = None,
               api_tokens: tuple[str, ...] | None = None, config_path: str | Path | None = None) -> FastAPI:
    """The FastAPI app of the mixer.

    Args:
        config: validated config (``mixer.config.load_config``).
        rankers: (light, heavy) handles to use instead of loading from MLflow (embedding/tests).
        feature_hydrator: a feature hydrator to use instead of the configured one.
        multiprocess_dir: the workers' shared metrics folder when served by several processes
            (``mixer.metrics.MixerMetrics``).
        api_tokens: bearer tokens to accept instead of ``mixer.auth.accepted_tokens`` (config,
            ``$HOME_MIXER_API_TOKENS``, else the state folder's); unused when ``auth.enabled`` is false.
        config_path: the file ``config`` came from: a changed ``experiment`` section in it is
            served without a restart (``config_reload_interval_s``; ``mixer.config_watcher``).

    Resources open in the lifespan (on server start), so creating the app does no I/O beyond
    reading the accepted tokens (and generating the state folder's on first use).

    Raises:
        mixer.auth.AuthConfigError: an unusable token in the environment or an unsafe token file.
    """
    metrics = MixerMetrics(multiprocess_dir=multiprocess_dir)
    quality = LinearLatencyQualityFactor(config.quality_factor)  # this worker's; requests observe it
    TimelineRequest = _request_model(config)
    authenticated, verifier = _auth_dependencies(config, api_tokens)
    auth_responses = AUTH_RESPONSES if authenticated else {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        res = open_resources(config, metrics, rankers=rankers, feature_hydrator=feature_hydrator,
                             config_path=config_path)
        app.state.resources = res
        if config.gc.thresholds is not None:
            gc.set_threshold(*config.gc.thresholds)
        if config.gc.freeze_at_start:
            gc.collect()
            gc.freeze()
        log.info("mixer ready: models %s", res.pipeline.model_versions)
        try:
            yield
        finally:
            res.close()
            metrics.process_exits()

    app = FastAPI(title="home-mixer mixer", version="0.1.0", lifespan=lifespan,
                  description="Ranked home timelines: candidate sources, Feast features, light and heavy "
                              "rankers, weighted-sum blender, author diversity, cursor paging.")
    app.state.metrics = metrics
    app.openapi = _exact_integer_bounds(app.openapi, TimelineRequest)

    def observe_latency(latency_ms: float) -> None:
        """The quality factor sees what the caller saw: queue wait plus pipeline (mixer.admission)."""
        before = quality.factor
        if quality.observe(latency_ms) != before:
            metrics.quality_factor.set(quality.factor)

    # refuse past the in-flight bound before a thread is taken (mixer.admission)
    # only authenticated requests take a slot: others cannot crowd out callers (the route refuses them)
    app.add_middleware(InFlightLimitMiddleware, settings=config.overload, paths=(TIMELINE_PATH,),
                       on_reject=lambda: metrics.requests.labels(status="overloaded").inc(),
                       admit=None if verifier is None else (lambda scope: verifier.accepts(scope_token(scope))),
                       on_complete=observe_latency,
                       on_start=lambda waited_ms: metrics.queue_wait_seconds.observe(waited_ms / 1000.0))

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        return JSONResponse(status_code=422, content={"detail": errors, "message": _validation_message(errors)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # every error body is {"message": ...}, like the 422 and 503 ones (FastAPI's says "detail")
        return JSONResponse(status_code=exc.status_code, content={"message": str(exc.detail)}, headers=exc.headers)

    @app.post(TIMELINE_PATH, response_model=TimelineResponse, operation_id="homeTimeline",
              dependencies=authenticated,
              responses={200: {"links": NEXT_PAGE_LINK},
                         400: {"model": ErrorResponse, "description": "the body cannot be read (not UTF-8)"},
                         **auth_responses,
                         422: {"model": ValidationErrorResponse,
                               "description": "invalid body (not JSON, a bad or unknown field, a bad cursor); "
                                              "`message` names each bad field"},
                         503: {"model": ErrorResponse,
                               "description": "Redis unreachable, nothing could be served (every stage that "
                                              "fails open failed and no page was left), or the mixer is at its "
                                              "in-flight bound (`Retry-After` says when to retry)"}})
    def home_timeline(body: TimelineRequest, response: Response) -> Any:  # type: ignore[valid-type]
        """Rank one page of the user's home timeline (cold start: popular posts).

        Every answer names the worker process that served it (``X-Mixer-Worker``: its pid), so a
        caller or load balancer can tell the workers (and replicas) apart.
        """
        response.headers[WORKER_HEADER] = worker = str(os.getpid())
        pipeline: HomeTimelinePipeline = app.state.resources.pipeline
        try:
            cursor = PageCursor.decode(body.cursor) if body.cursor else None
        except CursorError as e:
            errors = [{"type": "value_error", "loc": ["body", "cursor"], "msg": str(e)}]
            return JSONResponse(status_code=422, content={"detail": errors, "message": _validation_message(errors)})
        factor = quality.factor
        try:
            result = pipeline.run(body.user_id, body.limit, cursor, surface=body.surface, quality_factor=factor)
        except redis.RedisError as e:
            metrics.requests.labels(status="unavailable").inc()
            log.error("home timeline of user %s failed: Redis: %r", body.user_id, e)
            return JSONResponse(status_code=503, content={"message": f"Redis is unreachable: {e}"},
                                headers={WORKER_HEADER: worker})
        if not result.items and result.degraded:
            # stages fell back and left nothing to serve (Redis down and a cold process, or every
            # source failed): no page is not an answer (the request metrics count it "unavailable")
            health = getattr(app.state.resources, "resilience", Resilience()).health
            why = ("Redis is unreachable and this mixer has nothing cached to serve yet"
                   if health is not None and not health.up else "no candidates could be served")
            return JSONResponse(status_code=503, headers={WORKER_HEADER: worker},
                                content={"message": f"{why} (degraded: {', '.join(result.degraded)})"})
        return _response(result)

    @app.get("/metrics", response_class=PlainTextResponse,
             dependencies=authenticated if config.auth.protect_metrics else [],
             responses={200: {"description": "Prometheus text exposition format",
                              "content": {"text/plain": {"schema": {"type": "string"}}}},
                        **(auth_responses if config.auth.protect_metrics else {})})
    def prometheus_metrics() -> PlainTextResponse:
        """Prometheus text exposition of this mixer's metrics."""
        return PlainTextResponse(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/healthz", responses={503: {"description": "unavailable: Redis does not answer and nothing is "
                                                         "cached to serve from",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}})
    def healthz() -> Any:
        """Whether this mixer can serve, and how.

        ``status``: "ok" (Redis answers; the stream processor is live, or none was seen: ``mode``
        batch_only is a mode, not a fault), "degraded" (still 200: Redis is down and requests are
        answered from the last-known-good caches, a stream processor that was live stopped, or with
        Sentinel the primary is gone: reads from a replica, writes buffered, ``buffered_writes.primary``),
        "unavailable" (503: Redis is down and nothing is cached, so no page can be served).
        Also: ``mode`` (realtime / batch_only / off), ``redis`` (up, down_for_s, last_error,
        outages), ``stream_processor``, ``caches`` (versions, entries, MiB), ``buffered_writes``,
        model versions and the index cutoff.
        """
        res: MixerResources = app.state.resources
        r = getattr(res, "resilience", None) or Resilience()
        meta = None
        coverage_error = None
        # while Redis is marked down only the store watcher probes it (every probe_s): a probe per
        # health check would wait out the socket timeout each time on a hung Redis
        if r.health is None or r.health.up:
            try:
                res.client.ping()
                meta = res.client.hget(keys.INDEX_META, "as_of")
                if r.health is not None:
                    r.health.mark_up()
            except redis.RedisError as e:
                if r.health is None:  # no resilience (an embedded pipeline): nothing to serve from
                    return JSONResponse(status_code=503, content={"status": "unavailable", "message": str(e)})
                r.health.observe(e)
        if r.health is None or r.caches is None or r.liveness is None or r.writes is None:
            return {"status": "ok", "model_versions": res.pipeline.model_versions,
                    "index_as_of": meta.decode() if meta else None}
        if r.health.up and config.realtime.enabled:
            try:  # the request path observes it too; read here so an idle mixer reports it
                hydrator = next(h for h in res.pipeline.declaration.feature_hydrators
                                if getattr(h, "liveness", None) is r.liveness)
                cov = hydrator.reader.coverage()
                r.liveness.observe(cov, hydrator.is_fresh(cov))
            except StopIteration:
                pass
            except redis.RedisError as e:
                coverage_error = repr(e)
        stream = r.liveness.summary() if config.realtime.enabled else {"mode": "off", "processor": "disabled"}
        stream_stopped = stream.get("processor") == "stopped"
        primary_down = not r.writes.health.up  # HA: reads from a replica, writes buffered for a new primary
        if r.health.up:
            status, code = ("degraded" if stream_stopped or primary_down else "ok"), 200
        elif r.caches.warm():
            status, code = "degraded", 200
        else:
            status, code = "unavailable", 503
        body = {"status": status, "mode": stream["mode"], "model_versions": res.pipeline.model_versions,
                "index_as_of": meta.decode() if meta else None, "redis": r.health.summary(),
                "stream_processor": {**stream, **({"error": coverage_error} if coverage_error else {})},
                "caches": r.caches.summary(), "buffered_writes": r.writes.stats()}
        return body if code == 200 else JSONResponse(status_code=code, content=body)

    return app


CONFIG_ENV = "HOME_MIXER_MIXER_CONFIG"  # the config path handed to worker processes


def app_from_env() -> FastAPI:
    """The app of one worker process (``uvicorn`` factory of ``--workers N``): config from
    ``$HOME_MIXER_MIXER_CONFIG`` (unset: the embedded one), Redis from ``$HOME_MIXER_REDIS_URL`` or
    the state folder, metrics summed over the workers through ``$HOME_MIXER_METRICS_DIR``."""
    path = os.environ.get(CONFIG_ENV) or None
    return create_app(load_config(path), multiprocess_dir=os.environ.get(METRICS_DIR_ENV), config_path=path)


def default_workers() -> int:
    """Worker processes by default: one per core (each holds its own models and connections)."""
    return max(1, os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> None:
    """``python -m mixer.api --config PATH --port N [--host H] [--redis-url URL] [--workers N]``.

    With ``--workers`` > 1, uvicorn's supervisor runs N worker processes on the one port (the
    kernel spreads connections) and replaces a worker that dies; each loads its own models and
    opens its own connections. Their metrics are summed through ``$HOME_MIXER_METRICS_DIR`` (a
    fresh temporary folder when the variable is unset; ``core.claim_prometheus_env``).

    Raises:
        SystemExit: bad arguments (argparse).
    """
    import tempfile

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m mixer.api", description="Serve the home-mixer mixer API.")
    parser.add_argument("--config", default=None, help="YAML config merged over the embedded mixer.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--redis-url", default=None, help="overrides redis_url of the config")
    parser.add_argument("--workers", type=int, default=1,
                        help=f"worker processes (default 1; `home-mixer serve mixer` uses {default_workers()}, the cores)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)  # fail here, once, on a bad config rather than in every worker
    if args.redis_url:
        config = config.with_overrides(redis_url=args.redis_url)
    if args.workers == 1:
        uvicorn.run(create_app(config, config_path=args.config), host=args.host, port=args.port,
                    log_level=args.log_level, access_log=False)
        return
    # workers are fresh interpreters: they inherit these before importing prometheus_client
    if args.config:
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
    if args.redis_url:
        os.environ["HOME_MIXER_REDIS_URL"] = args.redis_url
    if not os.environ.get(METRICS_DIR_ENV):
        os.environ[METRICS_DIR_ENV] = tempfile.mkdtemp(prefix="hm-mixer-metrics-")
    claim_prometheus_env()  # the workers' prometheus_client is file-backed from its import on
    uvicorn.run("mixer.api:app_from_env", factory=True, workers=args.workers, host=args.host, port=args.port,
                log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
