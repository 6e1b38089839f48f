"""Client of the BentoML ranker service: binary float32 batches over HTTP/1.1 keep-alive."""

from __future__ import annotations

import numpy as np
import httpx

from serving.bento.protocol import (
    ALIAS_HEADER, CONTENT_TYPE, MODEL_HEADER, MODELS_ROUTE, PREDICT_ROUTE, READY_ROUTE, SHAPE_HEADER,
    VERSION_HEADER, WireFormatError, decode_matrix, encode_matrix, format_shape, parse_shape,
)


class BentoUnavailable(RuntimeError):
    """The BentoML server did not answer with scores: unreachable, deadline passed, server error,
    or a refused request (:class:`BentoRequestError`). The message says which and where."""


class BentoTimeout(BentoUnavailable):
    """No answer within the deadline (``timeout_s``)."""


class BentoRequestError(BentoUnavailable):
    """The server refused the request (4xx): ``status`` and the server's ``message`` (e.g. unknown
    model or version, wrong number of feature columns)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"BentoML server refused the request ({status}): {message}")
        self.status = status
        self.message = message


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, list) and body:  # BentoML's own errors come as [{"error": ...}]
        body = body[0]
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return str(body)[:500]


class BentoRankerClient:
    """Scores feature batches on ``serving.bento.service`` (one pooled keep-alive connection set).

    Args:
        base_url: ``http://host:port`` of the server (``BentoServer.url``).

    Thread-safe (one ``httpx.Client``). Close it with :meth:`close` or use it as a context manager.
    """

    def __init__(self, base_url: str):
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "BentoRankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _post(self, route: str, timeout_s: float, **kwargs) -> httpx.Response:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        try:
            return self._http.post(route, timeout=httpx.Timeout(timeout_s), **kwargs)
        except httpx.TimeoutException as e:
            raise BentoTimeout(f"BentoML server {self.base_url}{route}: deadline of {timeout_s} s exceeded "
                               f"({type(e).__name__})") from e
        except httpx.HTTPError as e:
            raise BentoUnavailable(f"BentoML server {self.base_url}{route} unreachable: {type(e).__name__}: {e}; "
                                   "start it with `home-mixer serve bentoml start`") from e

    def predict(self, features: np.ndarray, model: str, version: int | None, timeout_s: float,
                alias: str | None = None) -> np.ndarray:
        """Probabilities of registered model ``model`` at ``version`` for each row of ``features``.

        Args:
            features: ``[N, F]`` numbers (sent as float32 little-endian), columns in the model's
                ``feature_names`` order, NaN for missing values.
            model: registered model name, e.g. ``"light_ranker"`` or ``"heavy_ranker"``.
            version: registered version; None scores with the version ``alias`` points at.
            timeout_s: deadline in seconds, applied to each network phase (connect, send,
                receive); a dead server fails at once (connection refused).
            alias: registry alias used when ``version`` is None (server default ``champion``).

        Returns:
            ``np.ndarray float32 [N, H]``, H = the model's heads.

        Raises:
            ValueError: ``features`` is not 2-D or ``timeout_s <= 0`` (a caller bug, not sent).
            BentoTimeout: no answer within ``timeout_s``.
            BentoRequestError: 4xx (unknown model/version, wrong column count); ``status``, ``message``.
            BentoUnavailable: unreachable, a 5xx, or a malformed answer.
        """
        features = np.asarray(features)
        if features.ndim != 2:
            raise ValueError(f"features must be a 2-D matrix [rows, columns], got shape {features.shape}")
        headers = {"Content-Type": CONTENT_TYPE, MODEL_HEADER: model, SHAPE_HEADER: format_shape(features.shape)}
        if version is not None:
            headers[VERSION_HEADER] = str(int(version))
        elif alias:
            headers[ALIAS_HEADER] = alias
        response = self._post(PREDICT_ROUTE, timeout_s, content=encode_matrix(features), headers=headers)
        if 400 <= response.status_code < 500:
            raise BentoRequestError(response.status_code, _error_message(response))
        if response.status_code != 200:
            raise BentoUnavailable(f"BentoML server {self.base_url} failed ({response.status_code}): "
                                   f"{_error_message(response)}")
        try:
            shape = parse_shape(response.headers.get(SHAPE_HEADER))
            out = decode_matrix(response.content, shape)
        except WireFormatError as e:
            raise BentoUnavailable(f"BentoML server {self.base_url} sent a malformed answer: {e}") from None
        if shape[0] != features.shape[0]:
            raise BentoUnavailable(f"BentoML server {self.base_url} returned {shape[0]} rows for {features.shape[0]}")
        return out

    def models(self, timeout_s: float = 5.0) -> dict:
        """The server's ``POST /models`` JSON: served models, loaded versions, feature names, heads.

        Raises:
            BentoUnavailable: unreachable, deadline passed, or not a 200.
        """
        response = self._post(MODELS_ROUTE, timeout_s)
        if response.status_code != 200:
            raise BentoUnavailable(f"BentoML server {self.base_url}{MODELS_ROUTE} answered "
                                   f"{response.status_code}: {_error_message(response)}")
        return response.json()

    def ready(self, timeout_s: float = 1.0) -> bool:
        """True if ``GET /readyz`` answers 200 within ``timeout_s``."""
        try:
            return self._http.get(READY_ROUTE, timeout=timeout_s).status_code == 200
        except httpx.HTTPError:
            return False
