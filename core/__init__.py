"""The ground of home-mixer: what every layer shares.

``schema`` (heads, tables, feature views), ``state`` (the state folder), ``services`` (process
supervision of Redis and the servers), ``online_layout`` (every Redis key), ``realtime`` (the
real-time features' buckets, windows and decay, shared by their writer and reader), ``lua`` (Redis
Lua scripts from ``.lua`` files with named keys), ``request_features`` (features computed at request
time, offline and online) and ``stages`` (the stage timer of long jobs).
Nothing here imports another home-mixer package (checked by the import-linter contract in
``pyproject.toml``).
"""

import os

# Feast sets PROMETHEUS_MULTIPROC_DIR on import, which turns prometheus-client metrics file-backed;
# claim the variable first so our process-local metrics stay in memory.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
