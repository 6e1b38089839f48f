"""HTTP API of the mixer: ``POST /v1/home-timeline``, ``GET /metrics``, ``GET /healthz``, ``/docs``.

Run: ``python -m mixer.api --config PATH --port N`` (uvicorn on 127.0.0.1 by default).
Start-up opens Redis, loads the light and heavy rankers from the MLflow registry by alias, builds
the pipeline, then ``gc.collect(); gc.freeze()``: the long-lived start-up objects (models, Feast
and MLflow modules) leave the young generations, so request-time collections scan only request
garbage (measured here: p99 ~118 ms -> ~11 ms).
"""


# prometheus_client before anything that imports feast: feast sets PROMETHEUS_MULTIPROC_DIR on
# import, which would make metrics file-backed (popped again after the feast import below).
import prometheus_client  # noqa: I001
# (no `from __future__ import annotations` here: FastAPI must resolve the request model built in create_app)

import argparse
import gc
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model

from core import online_layout as keys
from core.schema import HOME_SURFACE, KNOWN_SURFACES
from mixer.config import MixerConfig, load_config
from mixer.metrics import MixerMetrics
from mixer.model_watcher import ModelAliasWatcher
from mixer.pipeline import HomeTimelinePipeline, TimelineResult, build_pipeline, finite
from mixer.scorers import RankerHandle
from mixer.selectors import CursorError, PageCursor

log = logging.getLogger(__name__)


class TimelineItem(BaseModel):
    """One ranked post."""

    post_id: int
    author_id: int
    score: float | None = Field(description="blended score after author diversity (higher is better)")
    heads: dict[str, float | None] = Field(description="heavy ranker probability per engagement head")
    light_score: float | None
    source: str = Field(description="candidate source: in_network, popular or tag_interest")
    in_network: bool


class TimelineResponse(BaseModel):
    """One page of a home timeline."""

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


@dataclass
class MixerResources:
    """What start-up opens and shutdown closes."""

    client: redis.Redis
    executor: ThreadPoolExecutor
    pipeline: HomeTimelinePipeline
    watcher: ModelAliasWatcher | None = None
    backend: object | None = None  # the model-server client, closed at shutdown

    def close(self) -> None:
        """Stop the alias watcher, close the model-server client, the source pool and Redis."""
        if self.watcher is not None:
            self.watcher.stop()
        if self.backend is not None:
            self.backend.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()


SURFACE_DESCRIPTION = (
    f"the product surface the timeline is for (KuaiRand's `tab` id; request context, like the product "
    f"/ client context of Twitter's home-mixer). Default {HOME_SURFACE}, the home feed. Surfaces "
    f"{list(KNOWN_SURFACES)} have their own ranking features; any other integer >= 0 is accepted and "
    f"ranked as 'other'. A JSON integer: true/false, strings and fractions are rejected (422).")


def _request_model(config: MixerConfig) -> type[BaseModel]:
    page = config.page
    return create_model(
        "TimelineRequest",
        __config__=ConfigDict(extra="forbid"),
        user_id=(int, Field(ge=0, description="the viewer's user id")),
        limit=(int, Field(page.default_size, ge=1, le=page.max_size, description="posts per page")),
        cursor=(str | None, Field(None, description="next_cursor of the previous page; null for the first")),
        surface=(int, Field(HOME_SURFACE, ge=0, strict=True, description=SURFACE_DESCRIPTION)),
    )


def _validation_message(errors: list[dict[str, Any]]) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in errors)


def _feature_hydrator(config: MixerConfig, client: redis.Redis):
    from core.online_layout import FeastRedisLayout
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator, FeastSdkFeatureHydrator

    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)  # feast was imported above
    if config.feast.hydrator == "redis_layout":
        return FeastLayoutFeatureHydrator(client, FeastRedisLayout(config.feast.project,
                                                                   config.feast.entity_key_serialization_version))
    from feature_repo.store import open_store
    from core.state import StateDir

    from core.services import feast_connection_string

    return FeastSdkFeatureHydrator(open_store(StateDir.from_env(), feast_connection_string(config.resolved_redis_url())))


def _scoring_backend(config: MixerConfig):
    """The model-server client of ``scoring.backend`` (None for in-process); one per mixer."""
    if config.scoring.backend == "in_process":
        return None
    from mixer.scorers.remote import make_backend

    return make_backend(config.scoring.backend, config.scoring.url)


def _load_rankers(config: MixerConfig, metrics: MixerMetrics, backend=None) -> tuple[RankerHandle, RankerHandle]:
    """Both rankers at the alias's versions, warmed up, wrapped for ``backend`` (None: in-process)."""
    from models.registry import load_ranker

    uri = config.resolved_tracking_uri()
    m = config.models
    light = load_ranker(m.light_ranker, alias=m.alias, tracking_uri=uri)
    heavy = load_ranker(m.heavy_ranker, alias=m.alias, tracking_uri=uri)
    _warm_up(light, heavy)  # also the fallback of a remote backend: it must not be cold either
    if backend is None:
        return light, heavy
    from mixer.scorers.remote import RemoteRankerHandle

    scoring = config.scoring

    def on_fallback(model: str, path: str, reason: str) -> None:
        metrics.scoring_fallbacks.labels(model=model, backend=path, reason=reason).inc()

    return tuple(RemoteRankerHandle(h, backend, scoring.backend, scoring.timeout_ms / 1000.0, on_fallback)
                 for h in (light, heavy))


def _alias_versions(config: MixerConfig) -> dict[str, int]:
    from models.registry import alias_version

    uri, m = config.resolved_tracking_uri(), config.models
    return {"light_ranker": alias_version(m.light_ranker, m.alias, uri),
            "heavy_ranker": alias_version(m.heavy_ranker, m.alias, uri)}


def _warm_up(*handles: RankerHandle) -> None:
    """One prediction per model on two all-NaN rows: the first call of a torch.export graph or a
    LightGBM booster allocates and compiles (~0.25 s measured), which must not land on a request."""
    import numpy as np
    import pandas as pd

    for h in handles:
        h.predict(pd.DataFrame(np.nan, index=range(2), columns=list(h.feature_names)))


def open_resources(config: MixerConfig, metrics: MixerMetrics,
                   rankers: tuple[RankerHandle, RankerHandle] | None = None,
                   feature_hydrator=None) -> MixerResources:
    """Open Redis, load models (unless ``rankers`` is given), build the pipeline.

    Raises:
        ConfigError: no Redis configured. redis.RedisError: Redis does not answer.
        RuntimeError / MLflow errors: the registered models or their alias cannot be loaded.
    """
    url = config.resolved_redis_url()
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    backend = None
    try:
        client.ping()
        if rankers is None:
            backend = _scoring_backend(config)
            light, heavy = _load_rankers(config, metrics, backend)
        else:
            light, heavy = rankers
            _warm_up(light, heavy)
        hydrator = feature_hydrator or _feature_hydrator(config, client)
        executor = ThreadPoolExecutor(max_workers=config.source_pool_workers, thread_name_prefix="hm-source")
        pipeline = build_pipeline(config, client=client, light=light, heavy=heavy, feature_hydrator=hydrator,
                                  executor=executor, metrics=metrics)
    except BaseException:
        client.close()
        if backend is not None:
            backend.close()
        raise
    watcher = None
    if rankers is None and config.models.reload_interval_s > 0:
        watcher = ModelAliasWatcher(pipeline, lambda: _alias_versions(config),
                                    lambda: _load_rankers(config, metrics, backend),
                                    config.models.reload_interval_s, metrics).start()
    return MixerResources(client=client, executor=executor, pipeline=pipeline, watcher=watcher, backend=backend)


def _response(result: TimelineResult) -> dict:
    return {
        "user_id": result.query.user_id,
        "surface": result.query.surface,
        "arm": result.query.arm or "",
        "items": [{
            "post_id": c.post_id, "author_id": c.author_id, "score": finite(c.score),
            "heads": {h: finite(p) for h, p in c.heads.items()}, "light_score": finite(c.light_score),
            "source": c.source, "in_network": c.in_network,
        } for c in result.items],
        "next_cursor": result.next_cursor.encode() if result.next_cursor else None,
        "model_versions": result.model_versions,
        "scoring_paths": result.scoring_paths,
        "timings_ms": result.timings_ms,
    }


def create_app(config: MixerConfig, *, rankers: tuple[RankerHandle, RankerHandle] | None = None,
               feature_hydrator=None) -> FastAPI:
    """The FastAPI app of the mixer.

    Args:
        config: validated config (``mixer.config.load_config``).
        rankers: (light, heavy) handles to use instead of loading from MLflow (embedding/tests).
        feature_hydrator: a feature hydrator to use instead of the configured one.

    Resources open in the lifespan (on server start), so creating the app does no I/O.
    """
    metrics = MixerMetrics()
    TimelineRequest = _request_model(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        res = open_resources(config, metrics, rankers=rankers, feature_hydrator=feature_hydrator)
        app.state.resources = res
        gc.collect()
        gc.freeze()
        log.info("mixer ready: models %s", res.pipeline.model_versions)
        try:
            yield
        finally:
            res.close()

    app = FastAPI(title="home-mixer mixer", version="0.1.0", lifespan=lifespan,
                  description="Ranked home timelines: candidate sources, Feast features, light and heavy "
                              "rankers, weighted-sum blender, author diversity, cursor paging.")
    app.state.metrics = metrics

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError):
        errors = jsonable_encoder(exc.errors())
        return JSONResponse(status_code=422, content={"detail": errors, "message": _validation_message(errors)})

    @app.post("/v1/home-timeline", response_model=TimelineResponse,
              responses={422: {"description": "invalid body; `message` names each bad field"},
                         503: {"description": "Redis unreachable"}})
    def home_timeline(body: TimelineRequest) -> Any:  # type: ignore[valid-type]
        """Rank one page of the user's home timeline (cold start: popular posts)."""
        pipeline: HomeTimelinePipeline = app.state.resources.pipeline
        try:
            cursor = PageCursor.decode(body.cursor) if body.cursor else None
        except CursorError as e:
            errors = [{"type": "value_error", "loc": ["body", "cursor"], "msg": str(e)}]
            return JSONResponse(status_code=422, content={"detail": errors, "message": _validation_message(errors)})
        try:
            result = pipeline.run(body.user_id, body.limit, cursor, surface=body.surface)
        except redis.RedisError as e:
            metrics.requests.labels(status="unavailable").inc()
            log.error("home timeline of user %s failed: Redis: %r", body.user_id, e)
            return JSONResponse(status_code=503, content={"message": f"Redis is unreachable: {e}"})
        return _response(result)

    @app.get("/metrics")
    def prometheus_metrics() -> Response:
        """Prometheus text exposition of this mixer's metrics."""
        return Response(metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Any:
        """200 with model versions and the index cutoff when Redis answers; 503 otherwise."""
        res: MixerResources = app.state.resources
        try:
            res.client.ping()
            meta = res.client.hget(keys.INDEX_META, "as_of")
        except redis.RedisError as e:
            return JSONResponse(status_code=503, content={"status": "unavailable", "message": str(e)})
        return {"status": "ok", "model_versions": res.pipeline.model_versions,
                "index_as_of": meta.decode() if meta else None}

    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m mixer.api --config PATH --port N [--host H] [--redis-url URL]``."""
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m mixer.api", description="Serve the home-mixer mixer API.")
    parser.add_argument("--config", default=None, help="YAML config merged over the embedded mixer.yaml")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--redis-url", default=None, help="overrides redis_url of the config")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_config(args.config)
    if args.redis_url:
        config = config.with_overrides(redis_url=args.redis_url)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
