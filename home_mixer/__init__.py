"""home-mixer: an ML ranking platform for home timelines (CLI, settings, shared schema, services)."""

import os

# Feast sets PROMETHEUS_MULTIPROC_DIR on import, which turns prometheus-client metrics file-backed;
# claim the variable first so our process-local metrics stay in memory.
os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
