"""The light ranker's in-process backend (``light_ranker.backend``): compiled by lleaves, or LightGBM.

``light_ranker_backend`` gives the mixer's light-ranker handle its scoring engine once per load
(start-up and each alias swap), never per request. The equality check at load takes real rows from
the feature log (``core.online_layout.SERVED_FEATURES``: the rows the rankers scored on earlier
requests), besides the rows ``models.compiled_light.boundary_rows`` builds from the model.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import redis

from core import online_layout as keys
from core.feature_log import decode_features
from core.schema import ALL_FEATURES
from core.state import StateDir

log = logging.getLogger(__name__)


def served_feature_rows(client: redis.Redis, n: int, stream: str = keys.SERVED_FEATURES) -> pd.DataFrame | None:
    """The newest ``n`` feature-log rows as a float64 frame with the ``ALL_FEATURES`` columns (NaN =
    missing), or None when there are none or they cannot be read (Redis down, another feature
    schema): the check then runs on the model's threshold rows alone (logged at info).

    ``client`` must return bytes (``decode_responses=False``, the mixer's client).
    """
    if n <= 0:
        return None
    try:
        entries = client.xrevrange(stream, count=n)
        if not entries:
            return None
        matrix = decode_features([f[b"features"] for _, f in entries], [f.get(b"schema", b"") for _, f in entries])
    except (redis.RedisError, KeyError, ValueError) as e:
        log.info("no feature-log rows for the light ranker's load check (%s: %s)", type(e).__name__, e)
        return None
    return pd.DataFrame(matrix, columns=list(ALL_FEATURES))


def light_ranker_backend(handle, settings, client: redis.Redis | None = None):
    """``handle`` as ``settings.backend`` scores it.

    Args:
        handle: the light ranker's ``models.registry.RankerHandle``.
        settings: ``mixer.config.LightRankerSettings``.
        client: Redis holding the feature log (None: threshold rows only in the check).

    Returns:
        ``backend == "lightgbm"``: ``handle`` unchanged. ``"compiled"``: the handle with its lleaves
        model (``handle.engine == "lleaves"``), or unchanged with a warning logged when lleaves is
        missing, compilation fails or the check finds a difference over 1e-6.
    """
    from models.registry import with_compiled_light

    if settings.backend == "lightgbm":
        return handle
    cache_dir, rows = load_check_inputs(handle, settings, client)
    return with_compiled_light(handle, cache_dir, check_rows=rows)


def load_check_inputs(handle, settings, client: redis.Redis | None) -> tuple[Path, pd.DataFrame | None]:
    """What a backend's load needs: the cache folder (``settings.cache_dir``, null:
    ``<state>/compiled``) and the feature log's newest ``settings.check_rows`` rows for the
    equality check (None: no client, no rows, or rows without the handle's features)."""
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else StateDir.from_env().compiled_models
    rows = served_feature_rows(client, settings.check_rows) if client is not None else None
    if rows is not None and not set(handle.feature_names) <= set(rows.columns):
        rows = None  # a model on features the mixer does not hydrate: its scorer refuses it with the reason
    return cache_dir, rows
