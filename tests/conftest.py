"""Shared fixtures: a real Redis server, a real Redis Cluster, a temporary state folder, a real local
Spark session.

Services are real (Debian's redis-server, pyspark local mode); each is started once per test
session and stopped by pid at the end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# A pytest-xdist worker's __main__ has neither __spec__ nor __file__, which pyspark.sql.connect
# (imported by great_expectations) takes for a doctest run without its extras, and exits the
# worker's import with SystemExit(0). Give it a file name so that check sees a normal program.
_main = sys.modules.get("__main__")
if _main is not None and getattr(_main, "__spec__", None) is None and not hasattr(_main, "__file__"):
    _main.__file__ = "<pytest-xdist worker>"

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")

from core.services import RedisServer  # noqa: E402  (core pops a stray PROMETHEUS_MULTIPROC_DIR)
# prometheus_client picks file-backed values at import when that variable is set, and feast sets it
# on import: import prometheus_client before any test imports feast, so metrics stay in memory here
import prometheus_client  # noqa: E402, F401
from core.state import DEFAULT_DATA_DIR, StateDir  # noqa: E402

DATA_DIR = Path(os.environ.get("HOME_MIXER_DATA", DEFAULT_DATA_DIR))

# Tests bring their own state, Redis and MLflow: never a developer's (a tracking server, say).
for _var in ("HOME_MIXER_STATE", "HOME_MIXER_REDIS", "HOME_MIXER_REDIS_TYPE", "HOME_MIXER_REDIS_SENTINEL_MASTER",
             "HOME_MIXER_REDIS_URL", "MLFLOW_TRACKING_URI",
             "MLFLOW_REGISTRY_URI"):
    os.environ.pop(_var, None)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real KuaiRand-Pure folder (../shared/data/kuairand-pure)."""
    if not (DATA_DIR / "log_standard_20220425_20220504.csv").exists():
        pytest.fail(f"real data not found in {DATA_DIR}; set HOME_MIXER_DATA")
    return DATA_DIR


@pytest.fixture(scope="session")
def session_state(tmp_path_factory) -> StateDir:
    return StateDir(tmp_path_factory.mktemp("state")).ensure()


@pytest.fixture(scope="session")
def redis_server(session_state):
    """A real redis-server on a free loopback port for the whole test session."""
    srv = RedisServer(session_state).start()
    yield srv
    srv.stop()


@pytest.fixture()
def redis_client(redis_server):
    """A client on a flushed database."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory):
    """A real local Redis Cluster (3 primaries + 3 replicas, ``home-mixer services start --cluster
    3``'s ``RedisCluster``) in its own state folder, for the whole session: one cluster per run
    (it takes ~3 s to form), used by the tests marked ``cluster``."""
    from core.services import RedisCluster

    cluster = RedisCluster(StateDir(tmp_path_factory.mktemp("cluster-state")).ensure(), shards=3).start()
    yield cluster
    cluster.stop()


@pytest.fixture()
def cluster_client(redis_cluster):
    """A ``RedisCluster`` client (``core.online_store.connect``) on a flushed cluster."""
    from core.online_store import connect

    client = connect(redis_cluster.address)
    client.flushall(target_nodes="primaries")
    yield client
    client.close()


@pytest.fixture(scope="session")
def spark():
    """A real local Spark session (local[2], UTC)."""
    from pipelines.spark import spark_session

    session = spark_session("home-mixer-tests")
    yield session
    session.stop()
