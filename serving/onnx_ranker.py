"""The heavy ranker scored in-process by ONNX Runtime, exported once per version and cached on disk.

The registered heavy ranker is a ``torch.export`` program. Run by torch, one request's ~200-1,000
rows cost 8-9 ms on one thread on this machine; the same graph exported to ONNX
(:func:`serving.export.to_onnx`, the file Triton serves) costs 3.3 ms in ONNX Runtime, with the
same probabilities to ~4e-7. Exporting takes ~4 s, so it happens once per model version: the file
is kept in ``<state>/compiled/`` under a name keyed by the version's MLflow run id and the exporter's
and runtime's versions, and every later load (a restart, a second worker, a rollback) reads it.

Every load is checked against torch before it serves (:func:`serving.export.verify_onnx`: max
|diff| <= :data:`MAX_ABS_DIFF` on the caller's real rows plus rows with each feature missing, all
missing and +-inf). A failed export, load or check makes :func:`onnx_or_none` log a warning and
return None: the caller keeps torch, which computes the same model. Source: ONNX Runtime
(https://onnxruntime.ai/docs/api/python/api_summary.html, ``InferenceSession.run`` is thread-safe).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from serving.export import (DEFAULT_TOLERANCE, INPUT_NAME, OUTPUT_NAME, ExportError, _set_metadata, _write_atomically,
                            onnx_session, to_onnx, verify_onnx)

log = logging.getLogger(__name__)

# the export's tolerance (serving.export): float32 network, two runtimes that sum in different orders
MAX_ABS_DIFF = DEFAULT_TOLERANCE
# bump when the cached file's meaning changes (export options)
CACHE_FORMAT = "onnx-heavy-v1"
# rows of the load-time check when the caller has no real rows (a mixer before its first request)
SYNTHETIC_ROWS = 256


class OnnxLoadError(RuntimeError):
    """The heavy ranker could not be exported to ONNX, loaded by ONNX Runtime, or checked."""


def cache_key(handle) -> str:
    """sha256 (hex) of what the exported file depends on: the registered version (name, version,
    MLflow run id: a retrained model is a new run) and the torch, onnx and onnxruntime versions."""
    from importlib.metadata import version

    h = hashlib.sha256()
    for part in (CACHE_FORMAT, handle.name, str(handle.version), handle.run_id, version("torch"), version("onnx"),
                 version("onnxruntime")):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class OnnxRanker:
    """A ranker scored by an ONNX Runtime session in this process.

    Attributes:
        session: the ``onnxruntime.InferenceSession`` (CPU, ``threads`` intra-op threads).
        path: the ONNX file in the cache folder.
        key: :func:`cache_key` of the version.
        from_cache: True when this load read ``path`` instead of exporting.
        max_abs_diff: the largest difference to torch seen by the load-time check.
        engine: ``"onnxruntime"`` (``models.registry.RankerHandle.engine`` reports it).
    """

    session: Any
    path: Path
    key: str
    from_cache: bool
    max_abs_diff: float = float("nan")
    engine: str = "onnxruntime"

    def predict(self, x: np.ndarray, n_jobs: int = 1) -> np.ndarray:
        """Probabilities of ``x`` (``float32 [N, F]``, NaN = missing; float64 is cast) as
        ``float32 [N, heads]``. ``n_jobs`` is ignored: the session's thread count is fixed when it
        is built (``onnx_or_none(threads=...)``).

        Raises:
            onnxruntime's ``InvalidArgument``: ``x`` is not ``[N, F]`` with the model's F.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]


def synthetic_rows(feature_names, n: int = SYNTHETIC_ROWS, seed: int = 0) -> pd.DataFrame:
    """``n`` seeded rows for the check when no real ones exist: ``float64 [n, F]`` of counts-like
    values (0-1,000, a tenth of them 0) and rates (0-1), with 5 % NaN."""
    rng = np.random.default_rng(seed)
    x = np.where(rng.random((n, len(feature_names))) < 0.5, rng.integers(0, 1000, (n, len(feature_names))),
                 rng.random((n, len(feature_names))))
    x[rng.random(x.shape) < 0.1] = 0.0
    x[rng.random(x.shape) < 0.05] = np.nan
    return pd.DataFrame(x.astype(np.float64), columns=list(feature_names))


def load_checked(handle, cache_dir: Path, check_rows: pd.DataFrame | None, load_program: Callable[[], Any],
                 threads: int = 1) -> OnnxRanker:
    """The ONNX Runtime ranker of ``handle``, read from ``cache_dir`` or exported, then checked.

    Args:
        handle: a heavy ranker (``models.registry.RankerHandle``, ``kind == "heavy"``) whose
            ``predict`` is the torch reference of the check.
        cache_dir: where exported files are kept (``StateDir.compiled_models``), created if missing;
            the file is ``<name>-v<version>-<key[:16]>.onnx``.
        check_rows: real rows with the handle's feature columns (NaN allowed); None or empty:
            :func:`synthetic_rows`.
        load_program: returns the version's ``torch.export`` program, called only when the file
            must be exported (``load_ranker_version(..., with_program=True).program``).
        threads: the session's intra-op threads.

    A cached file that cannot be loaded or fails the check is exported again (and replaced).

    Raises:
        OnnxLoadError: the export failed, or the check of a new export found a difference over
            :data:`MAX_ABS_DIFF` (the message says which); nothing is written then.
    """
    key = cache_key(handle)
    path = Path(cache_dir) / f"{handle.name}-v{handle.version}-{key[:16]}.onnx"
    rows = check_rows if check_rows is not None and len(check_rows) else synthetic_rows(handle.feature_names)
    if path.exists():
        try:
            session = onnx_session(path, threads)
            worst = verify_onnx(session, handle, rows, MAX_ABS_DIFF)  # the serving session, on this load's rows
            return OnnxRanker(session=session, path=path, key=key, from_cache=True, max_abs_diff=worst)
        except Exception as e:  # a damaged, half-written or altered file: export again
            log.warning("cached ONNX %s unusable (%s: %s); exporting again", path, type(e).__name__, e)
    program = load_program()
    if program is None:
        raise OnnxLoadError(f"{handle.name} v{handle.version} has no torch.export program (.pt2) to export; "
                            "re-train it with `home-mixer train --model heavy`")
    try:
        model = to_onnx(replace(handle, program=program))
        worst = verify_onnx(model, handle, rows, MAX_ABS_DIFF)
    except ExportError as e:
        raise OnnxLoadError(str(e)) from e
    _set_metadata(model, handle, handle.alias or None, worst)
    _write_atomically(model, path)
    return OnnxRanker(session=onnx_session(path, threads), path=path, key=key, from_cache=False, max_abs_diff=worst)


def onnx_or_none(handle, cache_dir: Path, check_rows: pd.DataFrame | None, load_program: Callable[[], Any],
                 threads: int = 1) -> OnnxRanker | None:
    """:func:`load_checked`, or None with a warning logged when onnxruntime is missing or the export,
    load or check fails: the caller then scores with torch (the same model, slower)."""
    label = f"{handle.name} v{handle.version}"
    try:
        ranker = load_checked(handle, cache_dir, check_rows, load_program, threads)
    except ImportError as e:
        log.warning("onnxruntime or the exporter is not installed (%s); %s scores with torch", e, label)
        return None
    except Exception as e:  # an exporter or runtime fault must never stop serving: torch is the same model
        log.warning("ONNX heavy ranker unavailable, %s scores with torch: %s: %s", label, type(e).__name__, e)
        return None
    log.info("%s in ONNX Runtime (%s %s, max |diff| to torch %.2g)", label,
             "loaded from" if ranker.from_cache else "exported to", ranker.path, ranker.max_abs_diff)
    return ranker
