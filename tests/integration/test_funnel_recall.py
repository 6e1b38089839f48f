"""Funnel recall of the light ranker, measured on real candidate sets: a real Redis with the
candidate index and online features written through Feast, real rankers trained and registered in
MLflow (champions), the mixer's own candidate generation, hydration and filters.

Checks: recall is a fraction and the counts add up; a light cut that keeps every candidate has
recall exactly 1; a light ranker that orders like the heavy ranker's blended score has recall 1
even when it keeps only the heavy ranker's top; the random floor is below it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import redis

from core import online_layout
from core.schema import FEATURE_VIEWS
from core.state import StateDir
from home_mixer.evaluation import (
    FunnelReport, add_funnel_to_report, control_weights, funnel_recall, validation_users,
)
from tests.integration.test_mixer_api import AS_OF, _canonical, _latest_rows

pytestmark = pytest.mark.integration

DB = 7  # own Redis database: other test modules flush db 0 (and 3, 6)
USERS = 12
LIGHT_K, HEAVY_K = 50, 10


def _train_rankers(data_dir, state: StateDir) -> pd.DataFrame:
    """Tiny real rankers on 1/10 of the users, registered as champions (as ``test_mixer_api``
    trains them), on the model features the dev frame (``tests.dev_frame``) computes: feature views
    added to the schema after it are left out of the models and of the online store here."""
    from core.schema import HEAVY_RANKER_FEATURES, LIGHT_RANKER_FEATURES
    from models.heavy_ranker import HeavyRankerParams
    from models.light_ranker import LightRankerParams
    from models.split import split_by_days
    from models.train import train_heavy, train_light
    from tests.dev_frame import build_dev_frame

    frame = build_dev_frame(data_dir)
    train_df, valid_df = split_by_days(frame[frame.user_id % 10 == 0], 2)
    train_light(train_df, valid_df, state, params=LightRankerParams(num_boost_round=20, early_stopping_rounds=5),
                feature_names=[f for f in LIGHT_RANKER_FEATURES if f in frame.columns])
    train_heavy(train_df, valid_df, state, params=HeavyRankerParams(hidden=(32,), tower=8, max_epochs=2, patience=1),
                feature_names=[f for f in HEAVY_RANKER_FEATURES if f in frame.columns])
    return frame


@pytest.fixture(scope="module")
def funnel_state(data_dir, redis_server, tmp_path_factory):
    """A state folder with the impressions table, trained champions (MLflow), the candidate index
    and the online features of the sampled users in Redis db ``DB``; yields (state, url, users)."""
    from feature_repo import store as fs
    from pipelines.candidate_index import build_candidate_index

    state = StateDir(tmp_path_factory.mktemp("funnel_state")).ensure()
    url = f"redis://127.0.0.1:{redis_server.port}/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    tables = _canonical(data_dir)
    state.table("impressions").parent.mkdir(parents=True, exist_ok=True)
    tables.impressions.to_parquet(state.table("impressions"))  # validation_users draws from it
    build_candidate_index(state, url, AS_OF, tables=tables)
    frame = _train_rankers(data_dir, state)
    users = validation_users(state, USERS, seed=3)
    store = fs.open_store(state, f"{redis_server.feast_connection_string},db={DB}")
    fs.apply(store, state.tables)
    scoped = frame[frame.user_id.isin(users)]
    for spec in FEATURE_VIEWS:
        store.write_to_online_store(spec.name, _latest_rows(frame if spec.join_keys == ("post_id",) else scoped, spec))
    yield state, url, users
    client.flushdb()
    client.close()


def _run(funnel_state, **kw) -> FunnelReport:
    state, url, users = funnel_state
    return funnel_recall(state, users, redis_url=url, as_of=AS_OF, **kw)


def test_users_are_real_validation_users_drawn_deterministically(funnel_state):
    state, _, users = funnel_state
    assert users == validation_users(state, USERS, seed=3) and len(set(users)) == USERS
    imp = pd.read_parquet(state.table("impressions"), columns=["user_id", "date"])
    last_days = sorted(imp["date"].unique())[-2:]
    assert set(users) <= set(imp.loc[imp["date"].isin(last_days), "user_id"])
    assert validation_users(state, USERS, seed=4) != users


def test_recall_is_a_fraction_and_counts_add_up(funnel_state, tmp_path):
    state, url, users = funnel_state
    r = _run(funnel_state, light_k=LIGHT_K, heavy_k=HEAVY_K)
    pr = r.per_request
    print(r.to_line())
    assert r.users == len(users) == len(pr) and pr["user_id"].tolist() == users
    assert r.requests + r.empty == r.users
    assert r.requests == USERS and not r.source_failures  # popular posts at least, for everyone
    scored = pr[pr["candidates"] > 0]
    assert r.small == int((scored["candidates"] <= LIGHT_K).sum())
    assert r.requests - r.small >= 1, "no request has more candidates than the light cut: nothing measured"
    assert r.mean_candidates == pytest.approx(scored["candidates"].mean())
    assert r.max_candidates == scored["candidates"].max()
    for col in ("recall", "random_recall"):
        assert scored[col].between(0, 1).all()
        # each is a count of posts over min(heavy_k, n)
        counts = scored[col] * np.minimum(HEAVY_K, scored["candidates"])
        assert np.allclose(counts, counts.round())
    assert 0 <= r.recall <= 1 and 0 <= r.random_recall <= 1
    assert r.recall == pytest.approx(scored["recall"].mean())
    assert (scored.loc[scored["candidates"] <= LIGHT_K, "recall"] == 1).all()
    large = scored[scored["candidates"] > LIGHT_K]
    assert r.recall_large == pytest.approx(large["recall"].mean())
    assert r.expected_random_recall == pytest.approx(np.minimum(1, LIGHT_K / scored["candidates"]).mean())
    assert r.model_versions == {"light_ranker": "1", "heavy_ranker": "1"}
    assert r.weights == control_weights()
    # the report lands in the evaluation JSON, next to what is there
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps({"heads": {}}))
    data = json.loads(add_funnel_to_report(path, r).read_text())
    assert data["heads"] == {} and data["funnel"]["recall"] == r.recall and data["funnel"]["requests"] == r.requests
    # nothing was served: the measurement writes no served-posts record, impression or feature log
    client = redis.Redis.from_url(url)
    try:
        assert not list(client.scan_iter(online_layout.served_posts("*")))  # type: ignore[arg-type]
        assert not client.exists(online_layout.SERVED_IMPRESSIONS, online_layout.SERVED_FEATURES)
    finally:
        client.close()


def test_a_light_cut_keeping_every_candidate_has_recall_one(funnel_state):
    first = _run(funnel_state, light_k=LIGHT_K, heavy_k=HEAVY_K)
    r = _run(funnel_state, light_k=first.max_candidates, heavy_k=HEAVY_K)
    assert r.small == r.requests >= 1
    assert r.recall == 1.0 and r.random_recall == 1.0 and r.recall_large is None
    assert (r.per_request["candidates"] == first.per_request["candidates"]).all()  # same candidate sets


class HeavyBlendAsLight:
    """A light ranker handle whose one head is the heavy ranker's blended score, computed as the
    blender computes it (same heads, weights, order of the sum)."""

    def __init__(self, heavy, weights: dict[str, float]):
        self.heavy, self.weights = heavy, weights
        self.feature_names, self.heads, self.version = heavy.feature_names, ("blend",), "heavy-blend"

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        probs = np.asarray(self.heavy.predict(frame), dtype="float64").tolist()
        col = {h: i for i, h in enumerate(self.heavy.heads)}
        return np.array([[sum(w * row[col[h]] for h, w in self.weights.items())] for row in probs], dtype="float64")


def test_a_light_ranker_ordering_like_the_heavy_blend_has_recall_one(funnel_state):
    from models.registry import load_ranker

    state = funnel_state[0]
    heavy = load_ranker("heavy_ranker", tracking_uri=state.mlflow_tracking_uri)
    light = HeavyBlendAsLight(heavy, control_weights())
    r = _run(funnel_state, light_k=HEAVY_K, heavy_k=HEAVY_K, rankers=(light, heavy))
    assert r.requests - r.small >= 1  # the cut bites: the light top is exactly the heavy top
    assert r.recall == 1.0 and r.recall_large == 1.0
    assert r.random_recall < 1.0
    assert r.model_versions == {"light_ranker": "heavy-blend", "heavy_ranker": "1"}



def test_whole_funnel_measures_the_served_pipeline_against_its_baselines(funnel_state, data_dir, redis_server,
                                                                         spark, tmp_path):
    """The whole-funnel evaluation on the real log and the mixer's own pipeline: an index as of the
    validation days' start (with Spark co-engagement neighbours and action sequences) in its own
    database, the champions of the module's registry, 40 users with later engagements."""
    import mlflow

    from home_mixer.whole_funnel import evaluated_days, log_to_mlflow, positives_by_user, whole_funnel
    from pipelines.candidate_index import build_candidate_index, build_coengagement

    state = funnel_state[0]
    tables = _canonical(data_dir)
    for name in ("posts", "social_edges"):
        getattr(tables, name).to_parquet(state.table(name))
    imp = pd.read_parquet(state.table("impressions"))
    days, as_of = evaluated_days(imp, 2)
    assert days == sorted(imp["date"].unique())[-2:] and as_of == pd.to_datetime(
        imp.loc[imp["date"].isin(days), "event_ts"], utc=True).min()
    url = f"redis://127.0.0.1:{redis_server.port}/10"
    client = redis.Redis.from_url(url)
    client.flushdb()
    neighbours = build_coengagement(spark, tables, as_of, log=None)
    build_candidate_index(state, url, as_of, tables=tables, coengagement=neighbours)
    ks = (10, 200, 500, 5000)
    report = whole_funnel(state, redis_url=url, prepare=False, n_users=40, seed=1, ks=ks, n_boot=200, log=None)
    print(report.to_table())
    positives = positives_by_user(imp, days)
    assert report.users == 40 and report.days == days and report.as_of == as_of.isoformat()
    assert set(report.orders) == {"engaged", "click", "long_view"}
    orders = report.orders["engaged"]
    assert {"served", "union", "popularity", "coengagement_baseline", "source:coengagement", "source:popular",
            "source:tag_interest", "source:in_network"} <= set(orders)
    for s in orders.values():
        r = [s.recall[k][0] for k in ks]
        assert all(0 <= x <= 1 for x in r) and r == sorted(r)  # recall grows with K
        assert all(s.recall[k][1] <= s.recall[k][0] <= s.recall[k][2] for k in ks)
        assert all(0 <= v <= 1 for v in s.coverage.values())
    # every source's surviving candidates and the served pages are inside the union
    full = orders["union"].recall[5000][0]
    assert report.union_recall["engaged"][0] == pytest.approx(full)  # K=5000 holds every candidate
    assert all(orders[n].recall[5000][0] <= full + 1e-12 for n in orders if n.startswith("source:") or n == "served")
    assert orders["union"].mean_list_len == pytest.approx(report.candidates["mean"])
    assert orders["served"].mean_list_len <= 5000 and orders["served"].recall[5000][0] > 0
    # the popularity list is the index's 7-day list
    top = [int(p) for p in client.zrevrange(online_layout.popular("7d"), 0, 9)]
    assert orders["popularity"].coverage[10] == pytest.approx(len(top) / report.catalogue)
    # users without click positives on those days leave the click table (recall is undefined for them)
    assert 0 < report.orders["click"]["served"].users <= 40 and len(positives["click"]) >= len(positives["engaged"]) / 2
    # the co-engagement source found something, from the user action sequences
    assert orders["source:coengagement"].mean_list_len > 0 and report.sources["coengagement"]["requests_failed"] == 0
    path = report.to_json(tmp_path / "whole_funnel.json")
    assert json.loads(path.read_text())["orders"]["engaged"]["served"]["recall"]["200"][0] == orders["served"].recall[200][0]
    run_id = log_to_mlflow(state, report, path)
    run = mlflow.MlflowClient(state.mlflow_tracking_uri).get_run(run_id)
    assert run.data.metrics["engaged.served.recall_at_200"] == pytest.approx(orders["served"].recall[200][0])
    client.flushdb()
    client.close()


def test_candidate_training_rows_are_the_served_candidates_labelled_by_the_next_days(funnel_state, data_dir,
                                                                                      redis_server, spark):
    """The light ranker's candidate-set training rows: the served pipeline's candidates as of a cutoff
    before the evaluated days, features as hydrated, labels from the label days only; a light ranker
    trained on them is registered without moving the champion and serves through the pipeline."""

    from core.schema import ALL_FEATURES, CANDIDATE_LIGHT_RANKER_FEATURES, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
    from home_mixer.candidate_training import candidate_training_set, training_cutoff
    from home_mixer.whole_funnel import as_of_generation, evaluated_days, positives_by_user
    from models.light_ranker import LightRankerParams
    from models.registry import load_ranker, load_ranker_version
    from models.split import split_by_days
    from models.train import train_light_on_candidates
    from pipelines.candidate_index import build_candidate_index, build_coengagement
    from tests.dev_frame import build_dev_frame

    state = funnel_state[0]
    tables = _canonical(data_dir)
    for name in ("posts", "social_edges"):
        getattr(tables, name).to_parquet(state.table(name))
    imp = pd.read_parquet(state.table("impressions"))
    label_days, cutoff = training_cutoff(imp, valid_days=2, horizon_days=2)
    eval_days, eval_cutoff = evaluated_days(imp, 2)
    assert max(label_days) < min(eval_days) and cutoff < eval_cutoff
    with pytest.raises(ValueError, match="need more than"):
        training_cutoff(imp, valid_days=2, horizon_days=len(imp["date"].unique()))
    url = f"redis://127.0.0.1:{redis_server.port}/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    build_candidate_index(state, url, cutoff, tables=tables, coengagement=build_coengagement(spark, tables, cutoff,
                                                                                            log=None))
    cts = candidate_training_set(state, redis_url=url, prepare=False, n_users=30, negatives_per_user=40, seed=2,
                                 log=None)
    frame = cts.frame
    assert cts.as_of == cutoff and cts.label_days == label_days and cts.users >= 30
    assert set(ALL_FEATURES) <= set(frame.columns) and len(frame) < cts.candidates
    positives = positives_by_user(imp, label_days)
    for uid, rows in frame.groupby("user_id"):
        engaged = positives["engaged"].get(uid, set())
        assert set(rows.loc[rows["engaged"] == 1, "post_id"]) <= engaged  # labels only from the label days
        assert ((rows["engaged"] == 0) | rows["post_id"].isin(engaged)).all()
        assert (rows["engaged"] == 0).sum() <= 40 and (rows["weight"] >= 1).all()
    assert frame["engaged"].sum() > 0
    # the rows carry the features the served pipeline hydrated for that candidate at the cutoff
    uid = int(frame["user_id"].iloc[0])
    with as_of_generation(url, state.mlflow_tracking_uri, cutoff) as generation:
        result = generation.run(uid)
    served = result.features.assign(post_id=[c.post_id for c in result.ranked]).set_index("post_id")
    mine = frame[frame["user_id"] == uid].set_index("post_id")
    np.testing.assert_array_equal(mine[list(ALL_FEATURES)].to_numpy(dtype=float),
                                  served.loc[mine.index, list(ALL_FEATURES)].to_numpy(dtype=float))

    _, valid = split_by_days(build_dev_frame(data_dir), 2)
    names = [f for f in CANDIDATE_LIGHT_RANKER_FEATURES if frame[f].notna().any()]
    res = train_light_on_candidates(frame, valid, state, set_champion=False, feature_names=names,
                                    params=LightRankerParams(num_boost_round=30, early_stopping_rounds=10,
                                                             min_data_in_leaf=5), context={"cutoff": str(cutoff)})
    assert res.model_version is not None and 0 <= res.metrics["valid_candidates_engaged_auc"] <= 1
    light = load_ranker_version(LIGHT_RANKER_NAME, res.model_version, state.mlflow_tracking_uri)
    assert tuple(light.feature_names) == tuple(names) and light.predict(frame.head(5)).shape == (5, 1)
    # the champion is untouched (set_champion=False) and the new version serves through the pipeline
    heavy = load_ranker(HEAVY_RANKER_NAME, tracking_uri=state.mlflow_tracking_uri)
    with as_of_generation(url, state.mlflow_tracking_uri, cutoff, rankers=(light, heavy)) as generation:
        assert generation.served.model_versions["light_ranker"] == str(res.model_version)
    client.flushdb()
    client.close()
