"""The direct Feast-layout reader against the real Feast SDK on a real Redis.

Synthetic feature rows (schema columns, some nulls, several rows per entity) are written with
``FeatureStore.write_to_online_store``; both hydrators must return identical frames, including NaN
for entities Feast never saw and for the user x tag features of candidates without a tag.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from core.online_layout import FeastRedisLayout
from core.id_features import id_bucket_columns
from core.schema import ALL_FEATURES, FEATURE_VIEWS, ID_FEATURES, USER_LONGTERM_VIEW, USER_TAG_VIEW
from core.state import StateDir
from mixer.candidate import Candidate, Query
from mixer.feature_hydrators import FeastLayoutFeatureHydrator, FeastSdkFeatureHydrator

pytestmark = pytest.mark.integration

NOW = pd.Timestamp("2022-05-04T16:00:00Z")
USERS, POSTS, AUTHORS, TAGS = range(1, 21), range(1, 201), range(1, 41), range(-1, 12)


def _author(post_id: int) -> int:
    return post_id % 40 + 1


def _view_frame(spec, entities: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    n = len(entities)
    frame = entities.copy()
    frame["event_timestamp"] = NOW - pd.to_timedelta(rng.integers(1, 500_000, n), unit="s")
    for name, dtype in spec.features.items():
        if dtype == "int64":
            frame[name] = rng.integers(0, 2_000_000_000, n).astype("int64")
        else:
            values = rng.normal(10, 5, n)
            values[rng.random(n) < 0.1] = np.nan  # missing values become nulls in Feast
            frame[name] = values
    return frame


def _tag(post_id: int) -> int:
    """The post's primary tag: 0..11, -1 (no tag) for multiples of 13."""
    return post_id % 13 - 1


def _synthetic_rows(rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    users = pd.DataFrame({"user_id": np.repeat(np.array(USERS[:-5], dtype="int64"), 2)})  # 2 rows per user
    posts = pd.DataFrame({"post_id": np.array(POSTS[:-50], dtype="int64")})  # the last 50 posts are cold
    pairs = pd.DataFrame([(u, a) for u in USERS[:-5] for a in AUTHORS if (u + a) % 3],
                         columns=["user_id", "author_id"]).astype("int64")
    # (user, tag) rows, 2 per pair; also a row for tag -1, which no candidate may read ("no tag")
    user_tags = pd.DataFrame([(u, t) for u in USERS[:-5] for t in TAGS for _ in range(2) if (u + t) % 4 or t < 0],
                             columns=["user_id", "tag_id"]).astype("int64")
    entities = {("user_id",): users, ("post_id",): posts, ("user_id", "author_id"): pairs,
                ("user_id", "tag_id"): user_tags}
    return {spec.name: _view_frame(spec, entities[spec.join_keys], rng) for spec in FEATURE_VIEWS}


@pytest.fixture(scope="module")
def feast_store(redis_server, tmp_path_factory):
    from feature_repo import store as fs

    state = StateDir(tmp_path_factory.mktemp("feast_state")).ensure()
    redis.Redis.from_url(redis_server.url).flushdb()
    store = fs.open_store(state, redis_server.feast_connection_string)
    rows = _synthetic_rows(np.random.default_rng(11))
    for spec in FEATURE_VIEWS:  # the offline tables the views point at, as the pipelines write them
        pq.write_table(pa.Table.from_pandas(rows[spec.name], preserve_index=False), state.table(spec.table),
                       coerce_timestamps="us")
    fs.apply(store, state.tables)
    for spec in FEATURE_VIEWS:
        store.write_to_online_store(spec.name, rows[spec.name])
    yield store, rows


def _candidates(post_ids):
    return [Candidate(post_id=p, source="popular", author_id=_author(p), tag_id=_tag(p)) for p in post_ids]


def _latest(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The newest row per entity, nulls included (what the online store keeps)."""
    return frame.sort_values("event_timestamp", kind="stable").drop_duplicates(keys, keep="last").set_index(keys)


@pytest.mark.parametrize("user_id", [3, 17, 999])  # 17: no user rows; 999: unknown everywhere
def test_layout_reader_equals_feast_sdk(feast_store, redis_server, user_id):
    store, rows = feast_store
    client = redis.Redis.from_url(redis_server.url)
    direct = FeastLayoutFeatureHydrator(client, FeastRedisLayout("home_mixer"))
    sdk = FeastSdkFeatureHydrator(store)
    query = Query(user_id=user_id, page_size=20, now_s=NOW.timestamp(), request_id="t")
    # repeats and cold posts included; 13 and 26 have no tag (-1), 5 and 44 share tag 4
    cands = _candidates([5, 180, 5, 77, 151, 2, 199, 40, 13, 44, 26])
    a = direct.hydrate(query, cands)
    b = sdk.hydrate(query, cands)
    assert list(a.columns) == list(ALL_FEATURES) and len(a) == len(cands)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    # id buckets: hashed from the ids, whatever the store holds
    buckets = id_bucket_columns(user_id, [c.post_id for c in cands], [c.author_id for c in cands])
    for name in ID_FEATURES:
        np.testing.assert_array_equal(a[name].to_numpy(), buckets[name])
    # (user, tag) features: the latest row of (user, the candidate's primary tag); NaN without a tag
    ut = list(USER_TAG_VIEW.features)
    assert a.loc[[8, 10], ut].isna().all().all()  # tag -1 rows exist in the store but are never read
    tag_rows = _latest(rows["user_tag_features"], ["user_id", "tag_id"])
    for i, c in enumerate(cands):
        if c.tag_id < 0:
            continue
        if (user_id, c.tag_id) in tag_rows.index:
            want = tag_rows.loc[(user_id, c.tag_id), ut].to_numpy(dtype="float64")
            np.testing.assert_array_equal(a.loc[i, ut].to_numpy(dtype="float64"), want)
        else:
            assert a.loc[i, ut].isna().all()
    if user_id == 3:
        assert a.loc[0, ut].notna().any() and (a.loc[0, ut].to_numpy() == a.loc[9, ut].to_numpy()).all()
        longterm = _latest(rows["user_longterm_features"], ["user_id"]).loc[3, list(USER_LONGTERM_VIEW.features)]
        np.testing.assert_array_equal(a.loc[4, list(USER_LONGTERM_VIEW.features)].to_numpy(dtype="float64"),
                                      longterm.to_numpy(dtype="float64"))
    # the values are the latest written rows, not just "equal and empty"
    content = rows["content_features"].sort_values("event_timestamp").groupby("post_id").last()
    assert a.loc[0, "post_created_ts"] == float(content.loc[5, "post_created_ts"])
    assert a.loc[1, "post_duration_ms"] != a.loc[1, "post_duration_ms"]  # post 180 is cold: NaN
    if user_id == 3:
        latest = rows["user_features"][rows["user_features"].user_id == 3].sort_values("event_timestamp").iloc[-1]
        assert a.loc[0, "user_register_days"] == pytest.approx(latest["user_register_days"], nan_ok=True)
        assert a["tmp_last_impression_ts"].notna().all()
    else:
        assert a["user_register_days"].isna().all()
    client.close()


def test_empty_candidates_give_empty_frame(feast_store, redis_server):
    client = redis.Redis.from_url(redis_server.url)
    direct = FeastLayoutFeatureHydrator(client, FeastRedisLayout("home_mixer"))
    frame = direct.hydrate(Query(user_id=1, page_size=5, now_s=NOW.timestamp(), request_id="t"), [])
    assert frame.shape == (0, len(ALL_FEATURES))
    client.close()
