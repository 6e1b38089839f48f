"""The binary wire format shared by the BentoML ranker service and its client.

Request: ``POST /predict`` with body = the feature matrix as float32 little-endian bytes in C order
(``[N, F]``, columns in the model's ``feature_names`` order, NaN allowed) and headers

- ``X-Model``: registered model name (``light_ranker`` / ``heavy_ranker``), required;
- ``X-Model-Version``: registered version (int >= 1); without it, ``X-Model-Alias`` (default
  ``champion``) is resolved in the registry;
- ``X-Shape``: ``"N,F"``, required (the body length must be ``N * F * 4``).

Response 200: body = probabilities as float32 little-endian bytes ``[N, H]`` (H = the model's
heads), headers ``X-Shape: "N,H"``, ``X-Model-Version`` (the version that scored). Errors are JSON
``{"error": "..."}`` with status 400 (bad request), 404 (unknown model or version) or 422 (the
version is not a ranker logged by ``models.train``).
"""

from __future__ import annotations

import numpy as np

PREDICT_ROUTE = "/predict"
MODELS_ROUTE = "/models"
READY_ROUTE = "/readyz"
MODEL_HEADER = "X-Model"
VERSION_HEADER = "X-Model-Version"
ALIAS_HEADER = "X-Model-Alias"
SHAPE_HEADER = "X-Shape"
CONTENT_TYPE = "application/octet-stream"
WIRE_DTYPE = np.dtype("<f4")  # float32 little-endian, whatever the host's byte order


class WireFormatError(ValueError):
    """A body or header does not follow the wire format; the message says what was expected."""


def format_shape(shape: tuple[int, int]) -> str:
    """``(N, F)`` -> ``"N,F"``."""
    return f"{int(shape[0])},{int(shape[1])}"


def parse_shape(value: str | None) -> tuple[int, int]:
    """``"N,F"`` -> ``(N, F)`` with ``N >= 0`` and ``F >= 1``.

    Raises:
        WireFormatError: missing, not two comma-separated integers, or out of range.
    """
    if value is None:
        raise WireFormatError(f"missing header {SHAPE_HEADER}: send the matrix shape as 'rows,columns'")
    parts = value.split(",")
    try:
        rows, cols = (int(p) for p in parts)
    except ValueError:
        raise WireFormatError(f"header {SHAPE_HEADER} must be 'rows,columns' (two integers), got {value!r}") from None
    if rows < 0 or cols < 1:
        raise WireFormatError(f"header {SHAPE_HEADER}={value!r}: need rows >= 0 and columns >= 1")
    return rows, cols


def encode_matrix(x: np.ndarray) -> bytes:
    """A 2-D array as float32 little-endian C-order bytes (converted if needed).

    Raises:
        WireFormatError: ``x`` is not 2-D.
    """
    if x.ndim != 2:
        raise WireFormatError(f"expected a 2-D matrix [rows, columns], got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=WIRE_DTYPE).tobytes()


def decode_matrix(body: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Bytes -> ``float32 [rows, columns]`` (native byte order, writable copy).

    Raises:
        WireFormatError: the body length is not ``rows * columns * 4``.
    """
    rows, cols = shape
    expected = rows * cols * WIRE_DTYPE.itemsize
    if len(body) != expected:
        raise WireFormatError(
            f"body has {len(body)} bytes but {SHAPE_HEADER}={format_shape(shape)} needs {expected} "
            f"({rows} x {cols} float32 little-endian values)"
        )
    return np.frombuffer(body, dtype=WIRE_DTYPE).reshape(rows, cols).astype(np.float32)
