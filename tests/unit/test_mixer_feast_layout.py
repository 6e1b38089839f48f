"""Feast Redis layout pieces without a server: entity keys and Value decoding vs Feast's own code."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import Value

from core.online_layout import FeastRedisLayout
from mixer.feature_hydrators import decode_values


def test_template_keys_equal_feast_redis_key():
    layout = FeastRedisLayout("home_mixer")
    rng = random.Random(3)
    for _ in range(200):
        u, p, a = (rng.randint(-2**40, 2**62) for _ in range(3))
        assert layout.key("user_features", user_id=u) == layout.feast_key("user_features", user_id=u)
        assert layout.key("content_features", post_id=p) == layout.feast_key("content_features", post_id=p)
        assert layout.key("social_features", user_id=u, author_id=a) == \
            layout.feast_key("social_features", user_id=u, author_id=a)
    # join keys are sorted by name in the key: author_id comes before user_id
    k = layout.key("social_features", user_id=1, author_id=2)
    assert k.index(b"author_id") < k.index(b"user_id")


def test_only_serialization_v3():
    with pytest.raises(ValueError, match="version 3"):
        FeastRedisLayout("home_mixer", entity_key_serialization_version=2)


def test_decode_values_matches_protobuf():
    rng = random.Random(5)
    protos = [Value(double_val=rng.uniform(-1e9, 1e9)) for _ in range(50)]
    protos += [Value(int64_val=rng.randint(-2**63, 2**63 - 1)) for _ in range(50)]
    protos += [Value(int64_val=0), Value(double_val=0.0), Value(int32_val=-7), Value(float_val=1.5),
               Value(bool_val=True), Value()]
    raw = [p.SerializeToString() for p in protos] + [None]
    rng.shuffle(raw)
    got = decode_values(raw)
    for r, g in zip(raw, got):
        if not r:
            assert math.isnan(g)
            continue
        p = Value()
        p.ParseFromString(r)
        kind = p.WhichOneof("val")
        assert g == float(getattr(p, kind))
    assert got.dtype == np.float64


def test_decode_rejects_non_numeric():
    with pytest.raises(ValueError, match="not numeric"):
        decode_values([Value(string_val="x").SerializeToString()])
