"""Reads Feast's Redis online store directly, in Feast's own layout (no Feast SDK on the hot path).

Layout (feast 0.67, ``feast/infra/online_stores/redis.py`` + ``helpers.py``), one Redis hash per entity:
- key = ``serialize_entity_key(EntityKeyProto, v3) + project.encode()`` (``helpers._redis_key``).
  v3 serialisation: ``<I n_keys>``, then per join key *sorted by name* ``<I STRING=2><I len><utf8>``,
  then per value in the same order ``<I INT64=4><I 8><q value>`` (all little-endian). So the
  social view (user_id, author_id) is keyed author_id first. A view's join keys are the same for
  every view sharing them: the user view and the temporal view share one hash per user.
- field = ``helpers._mmh3(f"{view}:{feature}")`` (4 bytes, murmur3 32-bit little-endian);
  ``_ts:{view}`` holds the row's event time as a protobuf Timestamp.
- value = ``feast.types.Value`` protobuf; ``b""`` (empty Value) is null.
Feast's online read does not apply the view TTL, and neither does this reader (same answers).
"""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import redis

from core.schema import FEATURE_VIEWS, FeatureViewSpec
from mixer.candidate import Candidate, Query
from mixer.feature_hydrators.frame import empty_feature_frame, finish_feature_frame

_STRING, _INT64 = 2, 4  # feast ValueType enum values used in key serialisation


class FeastRedisLayout:
    """Keys and fields of Feast's Redis layout for the four feature views of ``core.schema``.

    Keys are built from a per-view byte template (fast), checked at construction against Feast's
    own ``_redis_key`` so a Feast upgrade that changes the layout fails loudly at start-up.

    Args:
        project: Feast project name (``feature_store.yaml``), e.g. ``"home_mixer"``.
        entity_key_serialization_version: must be 3 (the only version this layout supports).

    Raises:
        ValueError: another serialisation version, or Feast builds different keys than the template.
    """

    def __init__(self, project: str = "home_mixer", entity_key_serialization_version: int = 3,
                 views: tuple[FeatureViewSpec, ...] = FEATURE_VIEWS):
        if entity_key_serialization_version != 3:
            raise ValueError(
                f"only entity_key_serialization_version 3 is supported, got {entity_key_serialization_version}; "
                "set it to 3 in feature_store.yaml"
            )
        from feast.infra.online_stores.helpers import _mmh3

        self.project = project
        self._project_bytes = project.encode("utf-8")
        self.views = {v.name: v for v in views}
        self.fields: dict[str, list[bytes]] = {
            v.name: [_mmh3(f"{v.name}:{f}") for f in v.features] for v in views
        }
        self._sorted_keys: dict[str, tuple[str, ...]] = {}
        self._headers: dict[str, bytes] = {}
        for v in views:
            ordered = tuple(sorted(v.join_keys))
            header = [struct.pack("<I", len(ordered))]
            for k in ordered:
                kb = k.encode("utf8")
                header.append(struct.pack("<II", _STRING, len(kb)) + kb)
            self._sorted_keys[v.name] = ordered
            self._headers[v.name] = b"".join(header)
        self._check_against_feast()

    def key(self, view: str, **join_values: int) -> bytes:
        """Redis key of one entity row of ``view`` (join key name -> int64 value)."""
        parts = [self._headers[view]]
        for k in self._sorted_keys[view]:
            parts.append(struct.pack("<IIq", _INT64, 8, int(join_values[k])))
        parts.append(self._project_bytes)
        return b"".join(parts)

    def feast_key(self, view: str, **join_values: int) -> bytes:
        """The same key built by Feast (``helpers._redis_key``); slower, for checks."""
        from feast.infra.online_stores.helpers import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        names = list(self.views[view].join_keys)
        proto = EntityKey(join_keys=names, entity_values=[Value(int64_val=int(join_values[n])) for n in names])
        return _redis_key(self.project, proto, entity_key_serialization_version=3)

    def _check_against_feast(self) -> None:
        for name, spec in self.views.items():
            sample = {k: (-(7 ** (i + 3)) if i % 2 else 2 ** 40 + i) for i, k in enumerate(spec.join_keys)}
            if self.key(name, **sample) != self.feast_key(name, **sample):
                raise ValueError(f"Feast's Redis key layout for view {name} differs from this reader's; "
                                 "the installed feast version is not supported by mixer.feature_hydrators")


_VARINT_TAGS = (0x18, 0x20, 0x38)  # int32_val (3), int64_val (4), bool_val (7): wire type 0
_DOUBLE_TAG = 0x29  # double_val (5), wire type 1: tag byte + 8 bytes little-endian
_SHIFTS = (7 * np.arange(10)).astype(np.uint64)


def decode_values(raw: list[bytes | None]) -> np.ndarray:
    """Decode serialized ``feast.types.Value`` protobufs to float64 (NaN for None / empty / null).

    Vectorised over all values (one ``b"".join`` + numpy): ``double_val`` is the tag byte 0x29 and
    8 little-endian bytes; ``int64_val`` / ``int32_val`` / ``bool_val`` are a tag byte and a
    base-128 varint (negative ints are 10-byte two's complement), decoded with shifts. Any other
    encoding (float_val...) goes through protobuf parsing; non-numeric values raise ValueError.
    Checked against protobuf in tests/unit/test_mixer_feast_layout.py.
    """
    n = len(raw)
    out = np.full(n, np.nan)
    if n == 0:
        return out
    vals = [v or b"" for v in raw]
    lens = np.fromiter(map(len, vals), dtype=np.int64, count=n)
    buf = np.frombuffer(b"".join(vals), dtype=np.uint8)
    starts = np.zeros(n, dtype=np.int64)
    np.cumsum(lens[:-1], out=starts[1:])
    present = lens > 0
    tags = np.zeros(n, dtype=np.uint8)
    tags[present] = buf[starts[present]]

    doubles = present & (lens == 9) & (tags == _DOUBLE_TAG)
    if doubles.any():
        idx = starts[doubles][:, None] + np.arange(1, 9)
        out[doubles] = buf[idx].copy().view("<f8").ravel()

    varints = present & np.isin(tags, _VARINT_TAGS) & (lens <= 11)
    if varints.any():
        k = np.arange(10)
        body = lens[varints] - 1
        idx = np.minimum(starts[varints][:, None] + 1 + k, len(buf) - 1)
        groups = np.where(k[None, :] < body[:, None], buf[idx].astype(np.uint64) & np.uint64(0x7F), np.uint64(0))
        out[varints] = (groups << _SHIFTS).sum(axis=1, dtype=np.uint64).view(np.int64).astype(np.float64)

    rest = np.flatnonzero(present & ~doubles & ~varints)
    if len(rest):
        from feast.protos.feast.types.Value_pb2 import Value

        for i in rest.tolist():
            proto = Value()
            proto.ParseFromString(vals[i])
            kind = proto.WhichOneof("val")
            if kind is None or kind == "null_val":
                continue
            value = getattr(proto, kind)
            if not isinstance(value, (int, float)):
                raise ValueError(f"feature value of type {kind} is not numeric; the mixer reads int64/float64 features only")
            out[i] = float(value)
    return out


class FeastLayoutFeatureHydrator:
    """Features for 1 user + N posts + the distinct (user, author) pairs in one Redis pipeline.

    HMGETs: the user hash (user_features + temporal_features fields, both keyed by user_id: one
    HMGET each), one per distinct post (content_features), one per distinct author
    (social_features). Duplicated posts/authors are read once.

    Args:
        client: Redis holding Feast's online store (same server as the index is fine).
        layout: the key/field layout (project name).
    """

    name = "feast_layout"

    def __init__(self, client: redis.Redis, layout: FeastRedisLayout):
        self.client = client
        self.layout = layout
        self._user_views = [v for v in layout.views.values() if v.join_keys == ("user_id",)]
        self._post_views = [v for v in layout.views.values() if v.join_keys == ("post_id",)]
        self._pair_views = [v for v in layout.views.values() if set(v.join_keys) == {"user_id", "author_id"}]
        known = {("user_id",), ("post_id",)}
        odd = [v.name for v in layout.views.values()
               if v.join_keys not in known and set(v.join_keys) != {"user_id", "author_id"}]
        if odd:
            raise ValueError(f"feature views {odd} have join keys this hydrator does not know")

    def hydrate(self, query: Query, candidates: list[Candidate]) -> pd.DataFrame:
        """Float64 DataFrame aligned with ``candidates`` (row i = candidate i), columns ALL_FEATURES.

        Raises:
            redis.RedisError: Redis is unreachable.
        """
        if not candidates:
            return empty_feature_frame()
        lay = self.layout
        uid = query.user_id
        posts = list(dict.fromkeys(c.post_id for c in candidates))
        authors = list(dict.fromkeys(c.author_id for c in candidates))
        pipe = self.client.pipeline(transaction=False)
        for v in self._user_views:
            pipe.hmget(lay.key(v.name, user_id=uid), lay.fields[v.name])
        for v in self._post_views:
            for pid in posts:
                pipe.hmget(lay.key(v.name, post_id=pid), lay.fields[v.name])
        for v in self._pair_views:
            for aid in authors:
                pipe.hmget(lay.key(v.name, user_id=uid, author_id=aid), lay.fields[v.name])
        replies = iter(pipe.execute())

        n = len(candidates)
        columns: dict[str, np.ndarray] = {}
        for v in self._user_views:
            row = decode_values(next(replies))
            for j, f in enumerate(v.features):
                columns[f] = np.full(n, row[j])
        post_index = {p: i for i, p in enumerate(posts)}
        post_pos = np.fromiter((post_index[c.post_id] for c in candidates), dtype=np.int64, count=n)
        for v in self._post_views:
            block = self._block([next(replies) for _ in posts], len(v.features))[post_pos]
            for j, f in enumerate(v.features):
                columns[f] = block[:, j]
        author_index = {a: i for i, a in enumerate(authors)}
        author_pos = np.fromiter((author_index[c.author_id] for c in candidates), dtype=np.int64, count=n)
        for v in self._pair_views:
            block = self._block([next(replies) for _ in authors], len(v.features))[author_pos]
            for j, f in enumerate(v.features):
                columns[f] = block[:, j]
        return finish_feature_frame(pd.DataFrame(columns), query.now_s)

    @staticmethod
    def _block(rows: list[list[bytes | None]], width: int) -> np.ndarray:
        """HMGET replies (rows of ``width`` values) -> float64 matrix [len(rows), width]."""
        flat = [v for row in rows for v in row]
        return decode_values(flat).reshape(len(rows), width)
