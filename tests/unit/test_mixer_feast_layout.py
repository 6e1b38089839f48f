"""Feast Redis layout pieces without a server: entity keys and Value decoding vs Feast's own code."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
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


def test_batched_keys_equal_one_key_at_a_time_and_feast_redis_key():
    layout = FeastRedisLayout("home_mixer")
    values = np.array([0, 1, 7_583, 2**40, -5], dtype=np.int64)
    for name, spec in layout.views.items():
        vary = [k for k in spec.join_keys if k != "user_id"] or ["user_id"]
        fixed = {k: 123_456 for k in spec.join_keys if k != vary[0]}
        batch = layout.keys(name, vary[0], values, **fixed)
        assert batch == [layout.key(name, **fixed, **{vary[0]: int(x)}) for x in values]
        assert batch[2] == layout.feast_key(name, **fixed, **{vary[0]: 7_583})
    assert layout.keys("user_features", "user_id", []) == []
    with pytest.raises(KeyError):
        layout.keys("social_features", "author_id", values)  # user_id neither varies nor is fixed


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


def test_user_tag_keys_equal_feast_redis_key():
    layout = FeastRedisLayout("home_mixer")
    for u, t in ((1, 0), (3, 2 ** 40), (-5, 17)):
        assert layout.key("user_tag_features", user_id=u, tag_id=t) == \
            layout.feast_key("user_tag_features", user_id=u, tag_id=t)
    k = layout.key("user_tag_features", user_id=1, tag_id=2)
    assert k.index(b"tag_id") < k.index(b"user_id")  # sorted by name


def test_layout_hydrator_rejects_unknown_join_keys():
    import dataclasses

    from core.schema import USER_VIEW
    from mixer.feature_hydrators import FeastLayoutFeatureHydrator

    odd = dataclasses.replace(USER_VIEW, name="user_video_type", join_keys=("user_id", "video_type"))
    with pytest.raises(ValueError, match="user_video_type.*author_id.*tag_id"):
        FeastLayoutFeatureHydrator(None, FeastRedisLayout("home_mixer", views=(USER_VIEW, odd)))


def test_finish_feature_frame_adds_id_buckets():
    import pandas as pd

    from core.id_features import id_bucket_columns
    from core.schema import ALL_FEATURES, ID_FEATURES
    from mixer.feature_hydrators.frame import finish_feature_frame, missing_feature_frame

    posts, authors = [5, 9, 5], [2, -1, 2]
    stored = pd.DataFrame({"user_click_rate": [0.1, 0.2, 0.3]})
    out = finish_feature_frame(stored, 1.65e9, 0, user_id=7, post_ids=posts, author_ids=authors)
    assert list(out.columns) == list(ALL_FEATURES) and len(out) == 3
    want = id_bucket_columns(7, posts, authors)
    for name in ID_FEATURES:
        np.testing.assert_array_equal(out[name].to_numpy(), want[name])
    assert out.loc[1, "id_author_bucket"] == 0 and out.loc[1, "id_post_bucket"] > 0  # unknown author
    assert out.loc[0, "id_post_bucket"] == out.loc[2, "id_post_bucket"] != out.loc[1, "id_post_bucket"]
    with pytest.raises(ValueError, match="3 feature rows"):
        finish_feature_frame(stored, 1.65e9, 0, user_id=7, post_ids=posts[:2], author_ids=authors)

    missing = missing_feature_frame(3, user_id=7, post_ids=posts, author_ids=authors)
    pd.testing.assert_frame_equal(missing[list(ID_FEATURES)], out[list(ID_FEATURES)])
    assert missing.drop(columns=list(ID_FEATURES)).isna().all().all()
    assert missing_feature_frame(2).isna().all().all()


def test_finish_feature_frame_of_columns_equals_the_frame_path_and_the_offline_request_features():
    import pandas as pd

    from core.request_features import add_request_features
    from core.schema import ALL_FEATURES, REQUEST_FEATURES
    from mixer.feature_hydrators.frame import finish_feature_frame

    rng = np.random.default_rng(5)
    n, now_s = 40, 1.65e9
    columns = {"user_click_rate": rng.random(n), "post_created_ts": now_s - rng.integers(0, 90_000, n).astype(float),
               "tmp_last_impression_ts": np.where(rng.random(n) < 0.3, np.nan, now_s - rng.integers(0, 90_000, n)),
               "tmp_impressions_1h": rng.integers(0, 5, n).astype(float),
               "tmp_impressions_24h": rng.integers(0, 50, n).astype(float)}
    posts, authors = rng.integers(0, 1000, n), rng.integers(-1, 100, n)
    out = finish_feature_frame(columns, now_s, 4, user_id=3, post_ids=posts, author_ids=authors)
    assert list(out.columns) == list(ALL_FEATURES) and out.dtypes.eq("float64").all()
    pd.testing.assert_frame_equal(out, finish_feature_frame(pd.DataFrame(columns), now_s, 4, user_id=3,
                                                            post_ids=posts, author_ids=authors))
    # the same request features as the training sets get (core.request_features, one code path)
    offline = add_request_features(pd.DataFrame(columns), pd.Timestamp(now_s, unit="s", tz="UTC"), surface=4)
    for name in (*REQUEST_FEATURES, "tmp_impressions_1h", "tmp_impressions_24h"):
        np.testing.assert_array_equal(out[name].to_numpy(), offline[name].to_numpy(dtype="float64"), err_msg=name)
    with pytest.raises(ValueError, match="user_click_rate has 39 rows"):
        finish_feature_frame({**columns, "user_click_rate": columns["user_click_rate"][:-1]}, now_s, 4, user_id=3,
                             post_ids=posts, author_ids=authors)


def test_set_feature_columns_writes_in_place_and_keeps_one_block():
    from core.schema import ALL_FEATURES
    from mixer.feature_hydrators.frame import finish_feature_frame, set_feature_columns

    n = 7
    frame = finish_feature_frame({"post_duration_ms": np.arange(n, dtype="float64")}, 1_651_406_400.0, 0,
                                 user_id=3, post_ids=list(range(n)), author_ids=[1] * n)
    assert frame._mgr.nblocks == 1
    before = frame.copy()
    names = [ALL_FEATURES[5], ALL_FEATURES[-1], ALL_FEATURES[40]]
    out = set_feature_columns(frame, {names[0]: np.linspace(0, 1, n), names[1]: 2.5, names[2]: np.full(n, np.nan)})
    assert out is frame and frame._mgr.nblocks == 1 and list(frame.columns) == list(ALL_FEATURES)
    np.testing.assert_array_equal(frame[names[0]].to_numpy(), np.linspace(0, 1, n))
    assert (frame[names[1]] == 2.5).all() and frame[names[2]].isna().all()
    untouched = [c for c in ALL_FEATURES if c not in names]
    pd.testing.assert_frame_equal(frame[untouched], before[untouched])
    set_feature_columns(frame, {"not_in_the_frame": np.arange(n, dtype="float64"), names[1]: 1.0})
    assert list(frame.columns) == [*ALL_FEATURES, "not_in_the_frame"] and (frame[names[1]] == 1.0).all()
    np.testing.assert_array_equal(frame["not_in_the_frame"].to_numpy(), np.arange(n))
    with pytest.raises(ValueError):
        set_feature_columns(frame, {names[0]: np.zeros(n + 1)})
