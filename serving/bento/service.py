"""BentoML service ``home_mixer_rankers``: both rankers behind one binary batch API.

Run it with ``bentoml serve serving.bento.service:HomeMixerRankers`` (``serving.bento.server``
does that as a child process). Endpoints (all BentoML APIs are POST):

- ``POST /predict``: float32 feature matrix in, float32 probabilities out; the wire format is in
  ``serving.bento.protocol`` (headers ``X-Model``, ``X-Model-Version`` or ``X-Model-Alias``,
  ``X-Shape``). 400 for a malformed request, 404 for an unknown model or version, 422 for a
  version that is not a ranker; JSON ``{"error": ...}`` in each case.
- ``POST /models`` (empty body): JSON ``{"service", "tracking_uri", "cache_versions", "models":
  {name: {"versions": {version: {"feature_names", "heads", "kind", "run_id"}}, "load_error"}}}``.
- ``GET /readyz`` (BentoML's): 200 once the ``champion`` version of every served model is loaded;
  ``GET /livez``: the process is up; ``GET /metrics``: BentoML's Prometheus metrics.

Configuration (environment of ``bentoml serve``):

- ``MLFLOW_TRACKING_URI``: the registry (default: the state folder's, ``StateDir.from_env()``);
- ``HOME_MIXER_BENTO_MODELS``: comma-separated model names served (default
  ``light_ranker,heavy_ranker``); any other name gets 404;
- ``HOME_MIXER_BENTO_CACHE_VERSIONS``: versions kept loaded per model (default 2, LRU).

Models are loaded from MLflow by version (``models:/<name>/<version>``) through
``models.registry.load_ranker_version`` (the one registry path) and kept in an LRU of loaded versions
(``serving.bento.cache``), so the mixer can move to a new version without restarting this server;
without a version the request's alias (default ``champion``) is resolved in the registry
(``models.registry.alias_version``) on every request.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import bentoml
import numpy as np
from bentoml.validators import ContentType

from core.schema import CHAMPION_ALIAS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from models.registry import RankerNotFoundError, alias_version, load_ranker_version
from serving.bento.cache import RankerVersionCache
from serving.bento.protocol import (
    ALIAS_HEADER, CONTENT_TYPE, MODEL_HEADER, MODELS_ROUTE, PREDICT_ROUTE, SHAPE_HEADER, VERSION_HEADER,
    WireFormatError, decode_matrix, encode_matrix, format_shape, parse_shape,
)

SERVICE_NAME = "home_mixer_rankers"
MODELS_ENV = "HOME_MIXER_BENTO_MODELS"
CACHE_ENV = "HOME_MIXER_BENTO_CACHE_VERSIONS"
DEFAULT_MODELS: tuple[str, ...] = (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)


class RankerRequestError(Exception):
    """A request the service refuses: ``status`` (400/404) and a message saying what to change."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def score_matrix(handle, x: np.ndarray) -> np.ndarray:
    """Probabilities float32 ``[N, len(heads)]`` of a ``models.registry.RankerHandle`` on a matrix.

    Args:
        handle: a loaded ranker (``kind`` ``"light"`` or ``"heavy"``).
        x: float32 ``[N, F]``, columns in ``handle.feature_names`` order, NaN = missing.

    The same steps as ``RankerHandle.predict`` minus building the matrix from a frame (which
    costs ~1 ms per 1000 rows): ``±inf`` becomes NaN as ``models.features.feature_matrix`` does,
    then ``predict_booster`` / ``predict_module``.

    Raises:
        RuntimeError: the model returned another shape.
    """
    if len(x) == 0:
        return np.zeros((0, len(handle.heads)), dtype=np.float32)
    x = np.where(np.isinf(x), np.float32(np.nan), x).astype(np.float32, copy=False)
    if handle.kind == "light":
        from models.light_ranker import predict_booster

        out = predict_booster(handle.model, x)
    else:
        from models.heavy_ranker import predict_module

        out = predict_module(handle.model, x)
    if out.shape != (len(x), len(handle.heads)):
        raise RuntimeError(f"{handle.name} v{handle.version} returned shape {out.shape}, "
                           f"expected {(len(x), len(handle.heads))}")
    return np.asarray(out, dtype=np.float32)


def _served_models() -> tuple[str, ...]:
    raw = os.environ.get(MODELS_ENV, "")
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    return names or DEFAULT_MODELS


def _cache_versions() -> int:
    raw = os.environ.get(CACHE_ENV, "2")
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{CACHE_ENV} must be an integer number of versions, got {raw!r}") from None


@bentoml.service(
    name=SERVICE_NAME,
    workers=1,  # each worker would hold its own copy of every loaded model
    threads=2,  # a new version's download does not stall requests for loaded versions
    traffic={"timeout": 120},  # first request of a version waits for its download and load
    logging={"access": {"enabled": False}},  # one line per batch would dominate the log
)
class HomeMixerRankers:
    """The ranker model server (see the module docstring for endpoints and configuration)."""

    def __init__(self) -> None:
        self.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or StateDir.from_env().mlflow_tracking_uri
        self.models = _served_models()
        self.cache = RankerVersionCache(self._load_version, capacity=_cache_versions())
        self.load_errors: dict[str, str] = {}
        self._preload()

    def _load_version(self, name: str, version: int):
        """``models.registry.load_ranker_version`` on this service's registry (the cache's loader)."""
        return load_ranker_version(name, version, tracking_uri=self.tracking_uri)

    def _alias_version(self, name: str, alias: str) -> int:
        """The version ``alias`` of ``name`` points at (``models.registry.alias_version``, one query)."""
        return alias_version(name, alias, tracking_uri=self.tracking_uri)

    def _preload(self) -> bool:
        """Load each served model's champion not loaded yet; True when all are."""
        for name in self.models:
            if name in self.cache.loaded():
                continue
            try:
                self.cache.get(name, self._alias_version(name, CHAMPION_ALIAS))
                self.load_errors.pop(name, None)
            except Exception as e:  # noqa: BLE001 - not ready, and /models says why; never crash the worker
                self.load_errors[name] = f"{type(e).__name__}: {e}"
        return not self.load_errors

    def __is_ready__(self) -> bool:
        """BentoML's ``/readyz``: every served model has a loaded version (retries the missing)."""
        return self._preload()

    def _resolve(self, headers) -> Any:
        """The handle named by the request headers, loaded (cached) by version."""
        name = headers.get(MODEL_HEADER)
        if not name:
            raise RankerRequestError(400, f"missing header {MODEL_HEADER}: name the model, one of {list(self.models)}")
        if name not in self.models:
            raise RankerRequestError(404, f"unknown model {name!r}: this server serves {list(self.models)}")
        raw_version = headers.get(VERSION_HEADER)
        try:
            if raw_version is not None:
                try:
                    version = int(raw_version)
                except ValueError:
                    raise RankerRequestError(
                        400, f"header {VERSION_HEADER} must be a registered version number, got {raw_version!r}"
                    ) from None
                if version < 1:
                    raise RankerRequestError(400, f"header {VERSION_HEADER} must be >= 1, got {version}")
            else:
                version = self._alias_version(name, headers.get(ALIAS_HEADER) or CHAMPION_ALIAS)
            return self.cache.get(name, version)
        except RankerNotFoundError as e:
            raise RankerRequestError(404, str(e)) from None
        except ValueError as e:  # the version exists but was not logged as a ranker
            raise RankerRequestError(422, str(e)) from None

    @bentoml.api(route=PREDICT_ROUTE)
    def predict(self, body: bytes, /, ctx: bentoml.Context) -> Annotated[bytes, ContentType(CONTENT_TYPE)]:
        """Score a float32 ``[N, F]`` batch (raw body) -> float32 ``[N, H]`` (raw body).

        Columns must be in the model's ``feature_names`` order (``POST /models`` lists them);
        NaN marks a missing feature. See ``serving.bento.protocol`` for headers and errors.
        """
        from starlette.responses import JSONResponse

        headers = ctx.request.headers
        try:
            shape = parse_shape(headers.get(SHAPE_HEADER))
            handle = self._resolve(headers)
            n_features = len(handle.feature_names)
            if shape[1] != n_features:
                raise RankerRequestError(
                    400, f"{handle.name} v{handle.version} takes {n_features} feature columns, the request has "
                    f"{shape[1]}; send them in this order: {list(handle.feature_names)}")
            # BentoML hands an empty body over as b"{}": a 0-row batch carries no bytes to check
            x = np.zeros((0, shape[1]), np.float32) if shape[0] == 0 else decode_matrix(body, shape)
        except WireFormatError as e:
            ctx.response.status_code = 400
            return JSONResponse({"error": str(e)}, status_code=400)
        except RankerRequestError as e:
            ctx.response.status_code = e.status  # BentoML copies the context's status onto the response
            return JSONResponse({"error": str(e)}, status_code=e.status)
        out = score_matrix(handle, x)
        ctx.response.headers[SHAPE_HEADER] = format_shape(out.shape)
        ctx.response.headers[VERSION_HEADER] = str(handle.version)
        return encode_matrix(out)

    @bentoml.api(route=MODELS_ROUTE)
    def models_info(self) -> dict:
        """Served models, their loaded versions (feature names, heads, kind, run id), load errors."""
        loaded = self.cache.loaded()
        return {
            "service": SERVICE_NAME,
            "tracking_uri": self.tracking_uri,
            "cache_versions": self.cache.capacity,
            "models": {
                name: {
                    "versions": {
                        str(v): {"feature_names": list(h.feature_names), "heads": list(h.heads),
                                 "kind": h.kind, "run_id": h.run_id}
                        for v, h in loaded.get(name, {}).items()
                    },
                    "load_error": self.load_errors.get(name),
                }
                for name in self.models
            },
        }
