"""Feast over the real Spark tables: point-in-time training sets and materialisation into real Redis.

On a slice of the real log: the training set Feast's Spark offline store builds must equal a plain
"latest feature row at or before the impression time" lookup, and after `materialize` the online
store must hold each entity's latest row.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from feature_repo import store as fs
from home_mixer import jobs
from core.schema import FEATURE_VIEWS, HEADS
from core.request_features import add_request_features

from tests.integration._slice_state import slice_state

pytestmark = pytest.mark.integration

SLICE_ROWS = 6000


@pytest.fixture(scope="module")
def built(tmp_path_factory, spark, redis_server, data_dir):
    state = slice_state(tmp_path_factory.mktemp("feast_store"), spark, data_dir, SLICE_ROWS)
    store = fs.open_store(state, redis_server.feast_connection_string)
    fs.apply(store, state.tables)
    ts = jobs.training_set(spark, store, state)
    return state, store, ts


def _latest_at_or_before(table: pd.DataFrame, keys: list[str], rows: pd.DataFrame, ttl_days: int) -> pd.DataFrame:
    """Reference point-in-time lookup: per entity row, the newest table row with ts <= t and within TTL."""
    table = table.sort_values("event_timestamp")
    out = []
    for _, r in rows.iterrows():
        m = np.ones(len(table), dtype=bool)
        for k in keys:
            m &= table[k].to_numpy() == r[k]
        cand = table[m & (table["event_timestamp"] <= r["event_timestamp"]).to_numpy()
                     & (table["event_timestamp"] >= r["event_timestamp"] - pd.Timedelta(days=ttl_days)).to_numpy()]
        out.append(cand.iloc[-1] if len(cand) else None)
    return out


def test_training_set_has_one_row_per_impression_with_its_labels(built):
    state, _, ts = built
    imp = pd.read_parquet(state.table("impressions"))
    assert len(ts) == len(imp)
    merged = ts.merge(imp.rename(columns={"event_ts": "event_timestamp"}),
                      on=["user_id", "post_id", "event_timestamp"], suffixes=("", "_imp"))
    assert len(merged) == len(imp)
    for head in HEADS:
        assert (merged[head] == merged[f"{head}_imp"]).all(), head


@pytest.mark.parametrize("spec", FEATURE_VIEWS, ids=lambda s: s.name)
def test_point_in_time_join_equals_reference_lookup(built, spec):
    """Features as served: the latest row at or before the last materialisation before the request."""
    state, _, ts = built
    table = pd.read_parquet(state.table(spec.table))
    table["event_timestamp"] = pd.to_datetime(table["event_timestamp"], utc=True)
    sample = ts.sample(n=150, random_state=3)
    assert (sample["feature_ts"] == sample["request_ts"].dt.floor("h")).all()
    lookup = sample.assign(event_timestamp=sample["feature_ts"])
    rows = _latest_at_or_before(table, list(spec.join_keys), lookup, spec.ttl_days)
    expected = pd.DataFrame([{f: (np.nan if r is None else r[f]) for f in spec.features} for r in rows],
                            index=sample.index)
    # the training set applies the request-time rules (window counts age out) at the request start
    expected = add_request_features(expected, sample["request_ts"], surface=sample["tab"])
    mismatches = []
    for (_, got), (_, exp) in zip(sample.iterrows(), expected.iterrows()):
        for f in spec.features:
            want = exp[f]
            have = got[f]
            if pd.isna(want) and pd.isna(have):
                continue
            if pd.isna(want) or pd.isna(have) or not np.isclose(float(have), float(want)):
                mismatches.append((got["user_id"], got["post_id"], f, have, want))
    assert not mismatches, mismatches[:5]


def test_no_feature_sees_its_own_impression(built):
    _, _, ts = built
    # The user's history count at an impression equals their impressions strictly before the
    # materialisation its request was served from (never the impression itself, nor its request).
    ts = ts.sort_values("event_timestamp")
    assert (ts["feature_ts"] <= ts["event_timestamp"]).all()
    times = ts.groupby("user_id")["event_timestamp"].apply(lambda s: np.sort(s.dt.tz_convert(None).to_numpy()))
    before = pd.Series([int(np.searchsorted(times[u], np.datetime64(f.tz_convert(None)), side="left"))
                        for u, f in zip(ts["user_id"], ts["feature_ts"])], index=ts.index)
    known = ts["user_impressions"].notna()
    assert known.any()
    assert (ts.loc[known, "user_impressions"].to_numpy() == before[known].to_numpy()).all()


@pytest.fixture(scope="module")
def materialized(built):
    """One good ``materialize`` run (gate passed, Redis filled, the gate's baseline recorded), shared."""
    state, store, _ = built
    jobs.materialize(store, state)
    return built


def _online_hashes(client) -> dict:
    """Every Feast hash in a Redis database: key -> {field: value} (bytes), pipelined."""
    out = {}
    batch = []

    def flush():
        pipe = client.pipeline(transaction=False)
        for k in batch:
            pipe.hgetall(k)
        for k, v in zip(batch, pipe.execute(raise_on_error=False)):
            if isinstance(v, dict):  # the feature-version string is not a hash
                out[k] = v
        batch.clear()

    for k in client.scan_iter(count=10_000):
        batch.append(k)
        if len(batch) >= 5_000:
            flush()
    flush()
    return out


def test_the_projects_writer_writes_what_feast_materialize_writes(materialized, redis_server):
    """``engine="redis"`` (the default, ``feature_repo.online_writer``) against Feast's own
    ``materialize`` of the same tables and window, each into an empty database: every key, field
    and value byte for byte."""
    import redis

    state, store, _ = materialized
    # the window's last day: every view has rows in it, and Feast's writer (row by row) stays short
    _, end = jobs.materialize_window(state)
    start = end - pd.Timedelta(days=1)
    base = redis_server.url.rsplit("/", 1)[0]
    ours_db, theirs_db = redis.Redis.from_url(f"{base}/4"), redis.Redis.from_url(f"{base}/5")
    for db, engine in ((ours_db, "redis"), (theirs_db, "feast")):
        db.flushdb()
        url = f"{base}/{db.connection_pool.connection_kwargs['db']}"
        fs.materialize(fs.open_store(state, url), start, end, engine=engine)
    ours, theirs = _online_hashes(ours_db), _online_hashes(theirs_db)
    for db in (ours_db, theirs_db):
        db.flushdb()
    assert len(theirs) > 1000 and set(ours) == set(theirs)
    diff = [(k, f) for k in theirs for f in set(theirs[k]) | set(ours[k]) if theirs[k].get(f) != ours[k].get(f)]
    assert not diff, diff[:5]


def test_materialize_fills_redis_with_latest_rows(materialized):
    state, store, _ = materialized
    table = pd.read_parquet(state.table("user_features"))
    latest = table.sort_values("event_timestamp").groupby("user_id").tail(1).sample(n=40, random_state=1)
    feats = [f"user_features:{f}" for f in ("user_impressions", "user_click_rate", "user_follow_num")]
    online = store.get_online_features(features=feats,
                                       entity_rows=[{"user_id": int(u)} for u in latest["user_id"]]).to_df()
    for col in ("user_impressions", "user_click_rate", "user_follow_num"):
        np.testing.assert_allclose(online[col].astype(float).to_numpy(),
                                   latest[col].astype(float).to_numpy(), equal_nan=True)


def test_gate_stops_a_faulted_table_and_redis_keeps_the_last_good_values(materialized, tmp_path):
    """materialize validates first: a faulted content table raises before Redis is touched."""
    from monitoring.feature_validation import FeatureValidationError, inject_fault

    state, store, _ = materialized  # a good run: Redis filled, the gate's baseline recorded
    path = state.table("content_features")
    clean = pd.read_parquet(path)
    posts = [{"post_id": int(p)} for p in clean["post_id"].drop_duplicates().head(30)]
    feats = ["content_features:post_duration_ms", "content_features:post_click_rate_24h"]
    before = store.get_online_features(features=feats, entity_rows=posts).to_df()
    assert before["post_duration_ms"].notna().any()
    aside = tmp_path / "content_features.parquet"
    path.rename(aside)
    try:
        inject_fault(clean, "post_duration_ms", "post_click_rate_24h", null_share=0.5).to_parquet(path)
        with pytest.raises(FeatureValidationError) as err:
            jobs.materialize(store, state)
        failed = {(o.column, o.expectation) for o in err.value.report.failures()}
        assert ("post_duration_ms", "expect_column_median_to_be_between") in failed
        assert ("post_click_rate_24h", "expect_column_values_to_not_be_null") in failed
        after = store.get_online_features(features=feats, entity_rows=posts).to_df()
        pd.testing.assert_frame_equal(after, before)
    finally:
        path.unlink()
        aside.rename(path)
