"""The ground of home-mixer: what every layer shares.

``schema`` (heads, tables, feature views), ``state`` (the state folder), ``services`` (process
supervision of Redis, single or HA, and the servers), ``online_store`` (the online store's address,
``redis://`` or ``redis+sentinel://``, and the one function that opens a client on it),
``online_layout`` (every Redis key), ``realtime`` (the
real-time features' buckets, windows and decay, shared by their writer and reader), ``lua`` (Redis
Lua scripts from ``.lua`` files with named keys), ``request_features`` (features computed at request
time, offline and online) and ``stages`` (the stage timer of long jobs).
Nothing here imports another home-mixer package (checked by the import-linter contract in
``pyproject.toml``).
"""

import os

# The metrics folder of a mixer served by several worker processes (mixer.api --workers); the only
# case in which prometheus-client metrics are meant to be file-backed.
METRICS_DIR_ENV = "HOME_MIXER_METRICS_DIR"


def claim_prometheus_env() -> None:
    """Set ``PROMETHEUS_MULTIPROC_DIR`` to ours: ``$HOME_MIXER_METRICS_DIR`` of a multi-worker mixer,
    else unset. Feast sets the variable to a folder of its own on import, which would turn every
    metric file-backed; call this at start-up and after anything that imports feast."""
    ours = os.environ.get(METRICS_DIR_ENV)
    if ours:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = ours
    else:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)


claim_prometheus_env()
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
