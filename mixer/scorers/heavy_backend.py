"""The heavy ranker's in-process backend (``heavy_ranker.backend``): ONNX Runtime, or torch.

``heavy_ranker_backend`` gives the mixer's heavy-ranker handle its scoring engine once per load
(start-up and each alias swap), never per request. The equality check at load takes real rows from
the feature log (``mixer.scorers.light_backend.served_feature_rows``: the rows the rankers scored
on earlier requests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import redis

from mixer.scorers.light_backend import load_check_inputs


def heavy_ranker_backend(handle, settings, load_program: Callable[[], Any], client: redis.Redis | None = None,
                         threads: int = 1):
    """``handle`` as ``settings.backend`` scores it.

    Args:
        handle: the heavy ranker's ``models.registry.RankerHandle``.
        settings: ``mixer.config.HeavyRankerSettings``.
        load_program: returns the version's ``torch.export`` program; called only when no exported
            file is cached for the version.
        client: Redis holding the feature log (None: synthetic rows in the check).
        threads: ONNX Runtime's intra-op threads (``scoring.threads``).

    Returns:
        ``backend == "torch"``: ``handle`` unchanged. ``"onnx"``: the handle scoring in ONNX Runtime
        (``handle.engine == "onnxruntime"``), or unchanged with a warning logged when onnxruntime
        is missing, the export fails or the check finds a difference over 1e-5.
    """
    from serving.onnx_ranker import onnx_or_none

    if settings.backend == "torch":
        return handle
    cache_dir, rows = load_check_inputs(handle, settings, client)
    fast = onnx_or_none(handle, cache_dir, rows, load_program, threads)
    return handle if fast is None else dataclasses.replace(handle, compiled=fast)
