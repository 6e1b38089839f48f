"""Materialisation into Feast's Redis online store without Feast's row-at-a-time path.

``feast materialize`` with the Spark offline store pulls the latest row per entity through Spark,
turns every value into a protobuf in Python row by row and writes them in batches of
``online_write_batch_size``: 130-160 s for the demo's six views on this machine. The online store's
layout is fixed by Feast (``core.online_layout.FeastRedisLayout``: key = serialised entity key +
project, field = murmur3 of ``view:feature``, value = ``feast.types.Value``, ``_ts:view`` = the row's
event time as a protobuf ``Timestamp``), so this writer produces the same bytes from the same rows:

1. per view, the latest row per entity with ``start <= event_timestamp <= end`` (what Feast's
   ``pull_latest_from_table_or_query`` selects; the tables have one row per entity and time, see
   ``pipelines.features``), read with pyarrow with the time filter pushed down;
2. every value encoded column-wise (a double is the tag byte 0x29 and 8 little-endian bytes, an int64
   a protobuf varint; a null is the empty ``Value()``, as Feast writes it);
3. one ``HSET`` per entity with every feature and the timestamp (``EXPIRE`` too when the store has
   ``key_ttl_seconds``), as Feast's ``online_write_batch`` does, ``batch_keys`` commands per round
   trip. The commands are built as RESP bytes column-wise (the value of a bulk string is the same
   for every row of an int64 column that shares it) and sent on one connection, as Redis's own
   mass-insertion guide does with ``redis-cli --pipe``
   (https://redis.io/docs/latest/develop/use/patterns/bulk-loading/): redis-py's per-command
   ``hset`` packing cost more than Redis itself here.

``tests/integration/test_feast_store.py`` compares every key, field and value byte for byte with a
``feast materialize`` of the same tables. Feast's registry is told about the interval
(``apply_materialization``) so ``feast`` CLI users see the same state either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import redis

from core.online_layout import FeastRedisLayout
from core.schema import FEATURE_VIEWS, FeatureViewSpec

TIMESTAMP_COLUMN = "event_timestamp"
DEFAULT_BATCH_KEYS = 5_000
_DOUBLE_TAG = b"\x29"  # feast.types.Value.double_val: field 5, wire type 1 (64-bit)
_INT64_TAG = 0x20  # feast.types.Value.int64_val: field 4, wire type 0 (varint)


@dataclass(frozen=True)
class ViewWrite:
    """One view's share of a materialisation: ``rows`` entities written, ``values`` feature values
    (rows x features), ``seconds`` spent reading, encoding and writing."""

    view: str
    rows: int
    values: int
    seconds: float


def latest_rows(table: str | Path, spec: FeatureViewSpec, start: datetime, end: datetime) -> pa.Table:
    """The latest row per entity of ``spec`` in its offline table with ``start <= event_timestamp
    <= end`` (both inclusive, UTC; Feast's materialisation window).

    Returns:
        A pyarrow table: ``spec.join_keys`` (int64), ``event_timestamp`` (timestamp[us, UTC]) and
        ``spec.features``; one row per entity.

    Raises:
        FileNotFoundError: the table does not exist (build the features first).
        KeyError: a feature of ``spec`` is missing from the table.
    """
    path = Path(table)
    if not path.exists():
        raise FileNotFoundError(f"feature table {path} not found: build the features first (home-mixer features build)")
    dataset = ds.dataset(str(path), format="parquet")
    missing = [c for c in (*spec.join_keys, TIMESTAMP_COLUMN, *spec.features) if c not in dataset.schema.names]
    if missing:
        raise KeyError(f"feature table {path} lacks columns {missing}; rebuild the features")
    ts_type = dataset.schema.field(TIMESTAMP_COLUMN).type
    lo, hi = (pa.scalar(_utc(t), type=ts_type) for t in (start, end))
    rows = dataset.to_table(columns=[*spec.join_keys, TIMESTAMP_COLUMN, *spec.features],
                            filter=(ds.field(TIMESTAMP_COLUMN) >= lo) & (ds.field(TIMESTAMP_COLUMN) <= hi))
    if rows.num_rows == 0:
        return rows
    # newest first per entity, then the first of each entity
    order = pc.sort_indices(rows, sort_keys=[*((k, "ascending") for k in spec.join_keys),
                                             (TIMESTAMP_COLUMN, "descending")])
    rows = rows.take(order)
    keys = np.column_stack([rows.column(k).to_numpy() for k in spec.join_keys])
    first = np.ones(len(keys), dtype=bool)
    first[1:] = (keys[1:] != keys[:-1]).any(axis=1)
    return rows.filter(pa.array(first))


def encode_values(column: pa.ChunkedArray | pa.Array, dtype: str) -> list[bytes]:
    """Serialised ``feast.types.Value`` protobufs of a column, as Feast's type map writes them.

    Args:
        column: ``[N]`` values; nulls (and NaN in a float column) become the empty ``Value()``.
        dtype: ``"float64"`` (``double_val``) or ``"int64"`` (``int64_val``), ``core.schema``'s feature dtypes.

    Returns:
        ``N`` byte strings.

    Raises:
        ValueError: another dtype.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if dtype == "float64":
        x = np.asarray(arr.cast(pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False), dtype="<f8")
        valid &= ~np.isnan(x)
        packed = x.tobytes()
        return [_DOUBLE_TAG + packed[8 * i:8 * i + 8] if ok else b"" for i, ok in enumerate(valid)]
    if dtype == "int64":
        x = np.asarray(arr.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False), dtype=np.int64)
        memo: dict[int, bytes] = {}
        out = []
        for v, ok in zip(x.tolist(), valid.tolist()):
            if not ok:
                out.append(b"")
                continue
            b = memo.get(v)
            if b is None:
                b = memo[v] = bytes([_INT64_TAG]) + _varint(v)
            out.append(b)
        return out
    raise ValueError(f"unsupported feature dtype {dtype!r}: core.schema features are int64 or float64")


def encode_timestamps(column: pa.ChunkedArray | pa.Array) -> list[bytes]:
    """Serialised ``google.protobuf.Timestamp`` of each instant (``Timestamp.FromDatetime``: whole
    seconds and the remaining nanoseconds, each omitted when 0), Feast's ``_ts:<view>`` values."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    us = np.asarray(arr.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False))
    memo: dict[int, bytes] = {}  # feature rows share their hourly times
    out = []
    for t in us.tolist():
        b = memo.get(t)
        if b is None:
            s, m = divmod(t, 1_000_000)
            b = (b"\x08" + _varint(s) if s else b"") + (b"\x10" + _varint(m * 1000) if m else b"")
            memo[t] = b
        out.append(b)
    return out


def write_views(client: redis.Redis, tables_dir: str | Path, start: datetime, end: datetime, *,
                project: str = "home_mixer", views: tuple[FeatureViewSpec, ...] = FEATURE_VIEWS,
                key_ttl_seconds: int | None = None, batch_keys: int = DEFAULT_BATCH_KEYS,
                progress: Callable[[int], None] | None = None) -> list[ViewWrite]:
    """Write the latest rows of every view in ``[start, end]`` into Feast's Redis layout.

    Args:
        client: the online store's Redis.
        tables_dir: the folder of the offline feature tables (``<table>.parquet`` per view).
        project: the Feast project (part of every key).
        key_ttl_seconds: ``EXPIRE`` each written key (the store's ``key_ttl_seconds``; None: never).
        batch_keys: entities per pipeline (bounds the client's memory; each is one round trip).
        progress: called with the entities of each written batch (progress bars).

    Returns:
        One ``ViewWrite`` per view, in ``views`` order.

    Raises:
        FileNotFoundError / KeyError: a table is missing or lacks a column (``latest_rows``).
        redis.RedisError: a write failed; the views before it are written (a rerun rewrites them).
    """
    import time

    from core.online_store import is_cluster

    layout = FeastRedisLayout(project, views=views)
    write = _write_cluster if is_cluster(client) else _write_one
    out = []
    for spec in views:
        t0 = time.perf_counter()
        rows = latest_rows(Path(tables_dir) / f"{spec.table}.parquet", spec, start, end)
        n = rows.num_rows
        write(client, _batches(rows, spec, layout, key_ttl_seconds, batch_keys), progress)
        out.append(ViewWrite(spec.name, n, n * len(spec.features), time.perf_counter() - t0))
    return out


def _batches(rows, spec: FeatureViewSpec, layout: FeastRedisLayout, key_ttl_seconds: int | None,
             batch_keys: int):
    """Per batch of ``batch_keys`` entities: ``(keys, commands, replies per command)``, each command
    the packed ``HSET`` (+ ``EXPIRE``) of one key."""
    fields = [f"_ts:{spec.name}".encode(), *layout.fields[spec.name]]
    heads = [_bulk(f) for f in fields]
    hset = b"*%d\r\n$4\r\nHSET\r\n" % (2 + 2 * len(fields))
    ttl = _bulk(str(int(key_ttl_seconds)).encode()) if key_ttl_seconds else None
    for lo in range(0, rows.num_rows, batch_keys):
        batch = rows.slice(lo, batch_keys)
        keys = layout.keys_of(spec.name, {k: batch.column(k).to_numpy() for k in spec.join_keys})
        columns = [encode_timestamps(batch.column(TIMESTAMP_COLUMN))]
        columns += [encode_values(batch.column(f), dtype) for f, dtype in spec.features.items()]
        parts = [[hset] * len(keys), [_bulk(k) for k in keys]]
        for head, values in zip(heads, columns):
            memo: dict[bytes, bytes] = {}
            parts.append([memo.get(v) or memo.setdefault(v, head + _bulk(v)) for v in values])
        commands = [b"".join(c) for c in zip(*parts)]
        if ttl is not None:
            commands = [c + b"*3\r\n$6\r\nEXPIRE\r\n" + _bulk(k) + ttl for c, k in zip(commands, keys)]
        yield keys, commands, 2 if ttl is not None else 1


def _write_one(client: redis.Redis, batches, progress) -> None:
    """Send the batches on one connection of ``client``, each while Redis applies the previous one."""
    conn = client.connection_pool.get_connection()
    try:
        pending = 0  # replies of the batch Redis is working on: read after the next batch is sent
        for keys, commands, per in batches:  # built while Redis applies the previous batch (one core each)
            _send(conn, commands)
            _read(conn, pending)
            pending = len(commands) * per
            if progress is not None:
                progress(len(keys))
        _read(conn, pending)
    except (redis.ConnectionError, redis.TimeoutError):
        conn.disconnect()  # out of sync with its replies: never back to the pool in use
        raise
    finally:
        client.connection_pool.release(conn)


def _write_cluster(client, batches, progress) -> None:
    """Send each batch's commands to the primaries owning their keys' slots (redis-py's
    ``RedisCluster`` slot map; CRC16 of the key mod 16384, Redis Cluster specification), one
    connection per primary, then read every primary's replies.

    Raises:
        redis.RedisError: a write failed; a slot moved meanwhile (``MOVED``): rerun after the
            cluster settles (the client refreshes its map on the error).
    """
    from redis.crc import key_slot

    conns: dict[str, tuple] = {}
    try:
        for keys, commands, per in batches:
            by_node: dict[str, list[bytes]] = {}
            for key, command in zip(keys, commands):
                node = client.nodes_manager.get_node_from_slot(key_slot(key))
                if node.name not in conns:
                    pool = client.get_redis_connection(node).connection_pool
                    conns[node.name] = (pool, pool.get_connection())
                by_node.setdefault(node.name, []).append(command)
            for name, node_commands in by_node.items():
                _send(conns[name][1], node_commands)
            for name, node_commands in by_node.items():
                _read(conns[name][1], len(node_commands) * per)
            if progress is not None:
                progress(len(keys))
    except (redis.ConnectionError, redis.TimeoutError):
        for _, conn in conns.values():
            conn.disconnect()
        raise
    finally:
        for pool, conn in conns.values():
            pool.release(conn)


def _bulk(b: bytes) -> bytes:
    """A RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(b), b)


def _send(conn, commands: list[bytes]) -> None:
    """Send packed commands on ``conn`` (a redis-py ``Connection``) in one write."""
    conn.send_packed_command([b"".join(commands)])


def _read(conn, replies: int) -> None:
    """Read ``replies`` replies from ``conn``, all of them even after an error (the connection must
    stay in step with its commands).

    Raises:
        redis.ResponseError: Redis refused a command (the first error).
    """
    error = None
    for _ in range(replies):
        try:
            conn.read_response()
        except redis.ResponseError as exc:
            error = error or exc
    if error is not None:
        raise error


def _utc(t) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize(timezone.utc) if ts.tzinfo is None else ts.tz_convert(timezone.utc)


def _varint(v: int) -> bytes:
    """Protobuf base-128 varint of an int64 (negative: its 64-bit two's complement, 10 bytes)."""
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        low = v & 0x7F
        v >>= 7
        if v:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)

