"""The Feast feature store of home-mixer: open, apply, point-in-time training sets, materialise.

Thin wrappers over the Feast SDK that put the state folder and the Redis address into the
environment ``feature_repo/feature_store.yaml`` reads (``${HOME_MIXER_STATE}``, ``${HOME_MIXER_REDIS}``,
``${HOME_MIXER_REDIS_TYPE}``, ``${HOME_MIXER_REDIS_SENTINEL_MASTER}``).

The online store may be one Redis or a Sentinel-managed primary + replicas: Feast's Redis online
store takes ``redis_type: redis_sentinel`` with the Sentinels as ``connection_string`` and the
primary's name as ``sentinel_master``, and writes through redis-py's ``Sentinel.master_for`` (so a
materialisation running through a failover reconnects to the promoted replica). A Redis Cluster is
``redis_type: redis_cluster`` with the nodes as ``connection_string`` (Feast's ``RedisCluster``).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from core import claim_prometheus_env
from core import online_layout as keys
from core.schema import FEATURE_VIEWS
from core.state import StateDir

FEATURE_REPO = Path(__file__).resolve().parent


def feast_env(state: StateDir, redis_connection: str) -> dict[str, str]:
    """Environment variables ``feature_store.yaml`` needs.

    Args:
        redis_connection: the online-store address (``redis://...`` or ``redis+sentinel://...``,
            ``core.online_store``), or Feast's own single-Redis form ``host:port[,db=N][,...]``.

    Raises:
        core.online_store.OnlineStoreAddressError: a malformed address.
    """
    from core.online_store import feast_online_store

    if "://" in redis_connection:
        online = feast_online_store(redis_connection)
    else:
        online = {"connection_string": redis_connection, "redis_type": "redis", "sentinel_master": "mymaster"}
    return {"HOME_MIXER_STATE": str(state.root), "HOME_MIXER_REDIS": online["connection_string"],
            "HOME_MIXER_REDIS_TYPE": online["redis_type"], "HOME_MIXER_REDIS_SENTINEL_MASTER": online["sentinel_master"]}


def open_store(state: StateDir, redis_connection: str):
    """A ``feast.FeatureStore`` on ``feature_repo/`` with this state folder and online store.

    Args:
        state: the state folder (registry in ``state/feast``, tables in ``state/tables``).
        redis_connection: the online-store address (``redis://host:port/db`` or
            ``redis+sentinel://host:port,.../service/db``), or Feast's ``host:port[,db=N]``.

    Raises:
        core.online_store.OnlineStoreAddressError: a malformed address.
    """
    state.ensure()
    import prometheus_client  # noqa: F401  (import before feast so metrics stay in memory)
    from feast import FeatureStore

    claim_prometheus_env()
    env = feast_env(state, redis_connection)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:  # feature_store.yaml is read (and ${VAR}s expanded) here, once
        return FeatureStore(repo_path=str(FEATURE_REPO))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def definitions(tables_dir: Path) -> list:
    """Entities and feature views of ``feature_repo/definitions.py`` over another tables folder."""
    from feature_repo.definitions import build_definitions

    return build_definitions(tables_dir)


def apply(store, tables_dir: Path) -> None:
    """Register entities and feature views (``feast apply``) over the parquet tables in ``tables_dir``."""
    store.apply(definitions(tables_dir))


def feature_refs() -> list[str]:
    """All ``view:feature`` references of the feature views of ``core.schema.FEATURE_VIEWS``, in schema order."""
    return [f"{v.name}:{f}" for v in FEATURE_VIEWS for f in v.features]


def historical_features(store, entity_df):
    """Point-in-time correct features for each entity row (``get_historical_features``).

    Args:
        entity_df: a Spark DataFrame (a large pandas frame runs the JVM out of memory) with
            ``user_id``, ``post_id``, ``author_id`` (int64) and ``event_timestamp`` (UTC), plus
            any label columns to carry through.

    Returns:
        pandas DataFrame: the entity columns plus every feature of ``feature_refs()``; a feature
        with no row at or before the entity time (within the view TTL) is NaN/None.
    """
    job = store.get_historical_features(entity_df=entity_df, features=feature_refs())
    return job.to_df()


MATERIALIZE_ENGINES = ("redis", "feast")


def materialize(store, start: datetime, end: datetime, *, engine: str = "redis", progress=None) -> list | None:
    """Load the latest feature values in ``[start, end]`` from the offline tables into Redis, then
    bump ``core.online_layout.FEATURE_VERSION`` (the mixer drops its cached post features within
    seconds of the change).

    Args:
        engine: ``"redis"`` (default): ``feature_repo.online_writer`` writes Feast's layout itself,
            the same bytes ``feast materialize`` writes (tested), about 10x faster here, and records
            the interval in Feast's registry; ``"feast"``: Feast's own ``materialize``.
        progress: with ``"redis"``, called with the entities of each written batch.

    Returns:
        The ``online_writer.ViewWrite`` per view (``"redis"``), or None (``"feast"``).

    Raises:
        ValueError: an unknown engine, or the views' tables are not in one folder.
        redis.RedisError: a write, or the version, failed (written values stay; a mixer keeps
            its cached ones until the next successful materialize or its restart).
    """
    import time

    if engine not in MATERIALIZE_ENGINES:
        raise ValueError(f"unknown materialisation engine {engine!r}; use one of {MATERIALIZE_ENGINES}")
    online = store.config.online_store
    client = _online_client(online.connection_string, redis_type=str(getattr(online.redis_type, "value", "redis")),
                            sentinel_master=online.sentinel_master)
    writes = None
    try:
        if engine == "feast":
            store.materialize(start_date=start, end_date=end)
        else:
            from feature_repo.online_writer import write_views

            views = [store.get_feature_view(spec.name) for spec in FEATURE_VIEWS]
            folders = {Path(v.batch_source.path).parent for v in views}
            if len(folders) != 1:
                raise ValueError(f"the feature views read tables from several folders {sorted(map(str, folders))}; "
                                 "run feast apply over one tables folder (or use engine='feast')")
            writes = write_views(client, folders.pop(), start, end, project=store.project,
                                 key_ttl_seconds=store.config.online_store.key_ttl_seconds, progress=progress)
            for view in views:  # as Feast's own materialize does, so `feast` CLI users see the interval
                store.registry.apply_materialization(view, store.project, start, end, commit=False)
            store.registry.commit()
        client.set(keys.FEATURE_VERSION, f"{time.time():.6f}")
    finally:
        client.close()
    return writes


def _online_client(connection_string: str, redis_type: str = "redis", sentinel_master: str = "mymaster"):
    """A ``redis.Redis`` from Feast's ``host:port[,host:port...][,db=N][,password=P][,ssl=true]``
    (``core.online_store.feast_online_store`` in reverse): with ``redis_type`` ``redis_sentinel``
    the hosts are Sentinels and the client writes to the primary named ``sentinel_master``; with
    ``redis_cluster`` they are cluster nodes (a ``RedisCluster`` client)."""
    from core.online_store import cluster_address, connect, sentinel_address

    hosts, options = [], {}
    for part in (p.strip() for p in connection_string.split(",")):
        if "=" in part:
            name, _, value = part.partition("=")
            options[name] = value
        else:
            host, _, port = part.rpartition(":")
            hosts.append((host or "127.0.0.1", int(port or 6379)))
    db, password = int(options.get("db", 0)), options.get("password")
    if redis_type == "redis_sentinel":
        return connect(sentinel_address(hosts, sentinel_master, db, password))
    if redis_type == "redis_cluster":
        return connect(cluster_address(hosts, password))
    import redis

    kwargs: dict = {"host": hosts[0][0], "port": hosts[0][1], "db": db}
    if password is not None:
        kwargs["password"] = password
    if "ssl" in options:
        kwargs["ssl"] = options["ssl"].lower() == "true"
    return redis.Redis(**kwargs)
