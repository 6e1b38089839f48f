"""Train the two-tower retrieval model on a slice of the real log (every 8th user, with their
pre-log history), register it in a real MLflow (SQLite) store with its candidate embeddings and
FAISS index, load it back by alias and query the index."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from core.schema import CHAMPION_ALIAS, TWO_TOWER_NAME
from core.state import StateDir
from models.ann_index import set_threads
from models.registry import RankerNotFoundError, load_two_tower, mlflow_uris, model_aliases
from models.two_tower import TwoTowerParams, latest_histories, validation_cutoff

pytestmark = pytest.mark.integration

USER_MOD = 8
PARAMS = TwoTowerParams(dim=32, id_dim=32, tag_dim=8, hidden=64, epochs=2, num_threads=1)


@pytest.fixture(scope="module")
def state(data_dir, tmp_path_factory) -> StateDir:
    """Canonical tables of every 8th user of the real log (impressions, posts, prelog events)."""
    from pipelines import canonical
    from pipelines.raw import load_raw

    set_threads(1)
    raw = load_raw(data_dir)
    log, _ = canonical.deduplicate_log(raw.log)
    log = log[log["user_id"] % USER_MOD == 0]
    impressions, _ = canonical.impressions_table(log, raw.videos)
    posts = canonical.posts_table(raw.videos)
    seqs = raw.sequences[raw.sequences["user_id"] % USER_MOD == 0] if raw.sequences is not None else None
    st = StateDir(tmp_path_factory.mktemp("two-tower-state")).ensure()
    for name, frame in (("impressions", impressions), ("posts", posts),
                        ("prelog_events", canonical.prelog_events_table(seqs, posts))):
        canonical.write_table(frame, st.table(name))
    return st


@pytest.fixture(scope="module")
def trained(state):
    from models.train import train_two_tower

    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    result = train_two_tower(state, params=PARAMS, refit=False, log=lambda _: None)
    assert {k: os.environ.get(k) for k in env_before} == env_before  # no global MLflow state left behind
    return result


def test_run_logs_params_metrics_and_registers_the_champion(trained, state):
    from mlflow import MlflowClient

    assert trained.model_version == 1
    assert model_aliases(TWO_TOWER_NAME, state.mlflow_tracking_uri) == {CHAMPION_ALIAS: 1}
    client = MlflowClient(tracking_uri=state.mlflow_tracking_uri, registry_uri=state.mlflow_tracking_uri)
    run = client.get_run(trained.run_id)
    assert run.data.params["ranker"] == "two_tower" and run.data.params["index_kind"] == "hnsw"
    imp = pd.read_parquet(state.table("impressions"))
    _, as_of = validation_cutoff(imp, 2)
    assert pd.Timestamp(run.data.params["as_of"]) == as_of  # default cutoff: the validation days' start
    m = trained.metrics
    for key in ("holdout_recall_at_100", "holdout_popular_recall_at_100", "index_recall_at_100", "train_seconds"):
        assert run.data.metrics[key] == pytest.approx(m[key])
    # learned something: far above a random list (100 / 7,583 posts), and the index agrees with exact search
    assert m["holdout_recall_at_100"] > 0.15 and m["holdout_users"] > 100
    assert m["index_recall_at_100"] > 0.95
    assert "two_tower.json" in {a.path for a in client.list_artifacts(trained.run_id)}
    # the registered version carries its runtime pins (faiss-cpu from requirements.lock)
    import mlflow.artifacts

    with mlflow_uris(state.mlflow_tracking_uri):
        reqs = open(mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{TWO_TOWER_NAME}/1/requirements.txt", dst_path=str(state.root / "reqs"))).read()
    assert {"faiss-cpu==1.15.1", "torch==2.13.0"} <= set(reqs.split())


def test_load_by_alias_and_query_the_index(trained, state):
    handle = load_two_tower(state.mlflow_tracking_uri)
    assert (handle.version, handle.alias, handle.run_id) == (1, CHAMPION_ALIAS, trained.run_id)
    posts = pd.read_parquet(state.table("posts"))
    assert handle.index.kind == "hnsw" and handle.index.ntotal == len(handle.item_ids) == len(posts)
    assert handle.item_vectors.shape == (len(posts), 32)
    # the registered artifacts reproduce the in-memory model: same towers, same candidate embeddings
    ids, vecs = trained.model.item_embeddings(posts)
    order = np.argsort(handle.item_ids)
    np.testing.assert_array_equal(handle.item_ids[order], np.sort(ids))
    np.testing.assert_allclose(handle.item_vectors[order], vecs[np.argsort(ids)], rtol=1e-6, atol=1e-7)

    from pipelines.sequences import engagement_sequences

    imp = pd.read_parquet(state.table("impressions"))
    prelog = pd.read_parquet(state.table("prelog_events"))
    _, as_of = validation_cutoff(imp, 2)
    histories = latest_histories(engagement_sequences(imp, prelog, as_of), as_of, 64)
    seqs = list(histories.values())[:50] + [[]]
    users = handle.user_embeddings(seqs)
    np.testing.assert_allclose(users, trained.model.user_embeddings(seqs), rtol=1e-6, atol=1e-6)
    found, scores = handle.search(users, 100)
    assert found.shape == scores.shape == (51, 100) and found.dtype == np.int64
    assert set(found.ravel().tolist()) <= set(posts["post_id"].tolist())
    assert (np.diff(scores, axis=1) <= 1e-5).all()
    same, _ = handle.retrieve(seqs, 100)
    np.testing.assert_array_equal(same, found)


def test_pyfunc_model_serves_the_same_lists(trained, state):
    import mlflow.pyfunc

    handle = load_two_tower(state.mlflow_tracking_uri)
    seqs = [[(int(p), int(a), "long_view") for p, a in zip(handle.item_ids[:3], [0, 0, 0])], []]
    with mlflow_uris(state.mlflow_tracking_uri):
        model = mlflow.pyfunc.load_model(f"models:/{TWO_TOWER_NAME}@{CHAMPION_ALIAS}")
    out = model.predict(pd.DataFrame({"action_sequence": seqs}), params={"k": 10})
    np.testing.assert_array_equal(np.stack(out["post_ids"].to_list()), handle.retrieve(seqs, 10)[0])


def test_a_challenger_leaves_the_champion_and_missing_models_say_what_to_do(trained, state, tmp_path):
    from models.train import train_two_tower

    second = train_two_tower(state, params=PARAMS, refit=False, set_champion=False, index_kind="flat",
                             log=lambda _: None)
    assert second.model_version == 2
    assert load_two_tower(state.mlflow_tracking_uri).version == 1
    from models.registry import promote

    promote(TWO_TOWER_NAME, 2, "challenger", tracking_uri=state.mlflow_tracking_uri)
    challenger = load_two_tower(state.mlflow_tracking_uri, alias="challenger")
    assert challenger.version == 2 and challenger.index.kind == "flat"
    with pytest.raises(RankerNotFoundError, match="train_two_tower"):
        load_two_tower(state.mlflow_tracking_uri, alias="nope")
    empty = StateDir(tmp_path / "empty").ensure()
    with pytest.raises(RankerNotFoundError, match="train_two_tower"):
        load_two_tower(empty.mlflow_tracking_uri)


def test_the_mixer_serves_the_champion_and_swaps_a_promoted_version_without_restart(trained, state):
    """The embedding source retrieves from the registered index; promoting another version moves
    the running pipeline onto it at the watcher's next poll (the rankers stay as they were)."""
    from dataclasses import dataclass

    import redis

    from core.schema import ALL_FEATURES, HEADS
    from mixer.candidate import EngagedAction, Query
    from mixer.components import FeatureHydrator
    from mixer.config import load_config
    from mixer.metrics import MixerMetrics
    from mixer.model_watcher import ModelAliasWatcher
    from mixer.pipeline import build_pipeline
    from models.registry import alias_version, promote

    @dataclass
    class Ranker:  # the rankers are not under test here: the retrieval model's swap is
        heads: tuple
        version: int = 1
        feature_names: tuple = (ALL_FEATURES[0],)

        def predict(self, frame):
            return np.zeros((len(frame), len(self.heads)), dtype=np.float32)

    class NoFeatures(FeatureHydrator):
        name = "store"

        def hydrate(self, query, candidates, features=None):  # pragma: no cover - not called
            raise AssertionError

    uri = state.mlflow_tracking_uri
    light, heavy = Ranker(("engaged",)), Ranker(HEADS)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pipeline = build_pipeline(load_config(None), client=redis.Redis(host="127.0.0.1", port=1), light=light,
                                  heavy=heavy, feature_hydrator=NoFeatures(), executor=pool, metrics=MixerMetrics(),
                                  retrieval=load_two_tower(uri))
        champion = alias_version(TWO_TOWER_NAME, CHAMPION_ALIAS, uri)
        assert pipeline.model_versions["two_tower"] == str(champion)
        source = pipeline.declaration.candidate_sources[1]
        handle = load_two_tower(uri)
        seq = tuple(EngagedAction(int(p), 0, "long_view", 0.0) for p in handle.item_ids[:3])
        query = Query(user_id=1, page_size=20, now_s=0.0, request_id="r", action_sequence=seq)
        found = source.fetch(query)
        assert source.name == "embedding" and len(found) == 300
        expected, _ = handle.retrieve([list(seq)], 303)
        assert [c.post_id for c in found] == [int(p) for p in expected[0] if p not in set(handle.item_ids[:3])][:300]

        other = 2 if champion == 1 else 1
        watcher = ModelAliasWatcher(
            pipeline, lambda: {"light_ranker": 1, "heavy_ranker": 1,
                               "two_tower": alias_version(TWO_TOWER_NAME, CHAMPION_ALIAS, uri)},
            lambda: (light, heavy, load_two_tower(uri)), interval_s=60, metrics=MixerMetrics())
        assert not watcher.check_once()  # nothing moved
        promote(TWO_TOWER_NAME, other, CHAMPION_ALIAS, tracking_uri=uri)
        try:
            assert watcher.check_once()
            assert pipeline.model_versions == {"light_ranker": "1", "heavy_ranker": "1", "two_tower": str(other)}
            assert pipeline.declaration.candidate_sources[1].retrieval.version == other
        finally:
            promote(TWO_TOWER_NAME, champion, CHAMPION_ALIAS, tracking_uri=uri)


def test_the_retrieval_score_embeds_posts_outside_the_registered_catalogue(trained, state):
    """A post created after the index build has no registered embedding: the candidate tower embeds
    it from its author, tag and content features, as it embeds the catalogue."""
    from mixer.candidate import Candidate, EngagedAction, Query
    from mixer.feature_hydrators.retrieval import RetrievalScoreFeatureHydrator

    handle = load_two_tower(state.mlflow_tracking_uri)
    posts = pd.read_parquet(state.table("posts")).drop_duplicates("post_id").head(2)
    known = posts.iloc[0]
    fresh = posts.iloc[[1]].assign(post_id=10**12)  # an id the model never saw
    cands = [Candidate(int(known.post_id), "popular", author_id=int(known.author_id), tag_id=int(known.primary_tag)),
             Candidate(10**12, "popular", author_id=int(fresh.author_id.iloc[0]), tag_id=int(fresh.primary_tag.iloc[0]))]
    frame = pd.DataFrame({"post_duration_ms": [np.nan, float(fresh.duration_ms.iloc[0])],
                          "post_is_ad": [np.nan, float(str(fresh.video_type.iloc[0]).upper() == "AD")]})
    seq = (EngagedAction(int(known.post_id), int(known.author_id), "long_view", 0.0),)
    query = Query(user_id=1, page_size=20, now_s=0.0, request_id="r", action_sequence=seq)
    out = RetrievalScoreFeatureHydrator(handle).hydrate(query, cands, frame)["retrieval_two_tower_score"].to_numpy()
    user = handle.user_embeddings([list(seq)])[0]
    row = int(np.flatnonzero(handle.item_ids == known.post_id)[0])
    assert out[0] == pytest.approx(float(handle.item_vectors[row] @ user), abs=1e-5)
    fresh_vec = handle.model.item_embeddings(fresh.assign(video_type=fresh.video_type.astype(str).str.upper()
                                                          .where(lambda v: v == "AD", "NORMAL")))[1][0]
    assert np.isfinite(out[1]) and out[1] == pytest.approx(float(fresh_vec @ user), abs=1e-5)


def test_the_index_job_re_embeds_a_later_catalogue_with_the_champion_towers(trained, state, monkeypatch):
    """``home-mixer index build``'s ANN step: the champion's towers, the catalogue as of a later
    cutoff (posts created since the training cutoff join it), a new registered version as champion."""
    from mlflow import MlflowClient

    from models.registry import alias_version
    from models.train import refresh_two_tower_index, servable_posts

    before = load_two_tower(state.mlflow_tracking_uri)
    original = pd.read_parquet(state.table("posts"))
    created = pd.to_datetime(original["created_ts"], utc=True)
    # KuaiRand's videos were all uploaded before the log: add one created after the training cutoff
    fresh = original.dropna(subset=["created_ts"]).tail(1).assign(
        post_id=10**9, created_ts=created.max() + pd.Timedelta(hours=1))
    posts = pd.concat([original, fresh], ignore_index=True)
    posts.to_parquet(state.table("posts"), index=False)
    later = created.max() + pd.Timedelta(hours=2)  # every dated post is servable then
    try:
        res = refresh_two_tower_index(state, later, query_users=300, log=lambda _: None)
        assert alias_version(TWO_TOWER_NAME, CHAMPION_ALIAS, state.mlflow_tracking_uri) == res.model_version
        after = load_two_tower(state.mlflow_tracking_uri)
        expected = servable_posts(posts, later)["post_id"].to_numpy()
        assert set(after.item_ids.tolist()) == set(expected.tolist())
        assert 10**9 in set(expected.tolist())
        assert res.metrics["new_posts"] == len(set(expected.tolist()) - set(before.item_ids.tolist())) == 1
        assert res.metrics["index_recall_at_100"] >= 0.9
        # the same towers: a user and an already-indexed post get the same vectors as before
        seq = [(int(p), 0, "long_view") for p in before.item_ids[:5]]
        np.testing.assert_allclose(after.user_embeddings([seq]), before.user_embeddings([seq]), atol=1e-6)
        row = {int(p): i for i, p in enumerate(after.item_ids)}
        old = {int(p): i for i, p in enumerate(before.item_ids)}
        shared = list(old)[:20]
        np.testing.assert_allclose(after.item_vectors[[row[p] for p in shared]],
                                   before.item_vectors[[old[p] for p in shared]], atol=1e-5)
        params = MlflowClient(state.mlflow_tracking_uri).get_run(res.run_id).data.params
        assert params["source_version"] == str(before.version) and params["index_kind"] == "hnsw"
        # rollback through the CLI: the two-tower has no request-GAUC gate, and no Triton serves it here
        from home_mixer.cli import main

        monkeypatch.setenv("HOME_MIXER_STATE", str(state.root))  # --state exports it: restored after
        assert main(["--state", str(state.root), "models", "promote", "--model", "two_tower",
                     "--version", str(before.version)]) == 0
        assert alias_version(TWO_TOWER_NAME, CHAMPION_ALIAS, state.mlflow_tracking_uri) == before.version
    finally:
        from models.registry import promote

        original.to_parquet(state.table("posts"), index=False)
        promote(TWO_TOWER_NAME, before.version, CHAMPION_ALIAS, tracking_uri=state.mlflow_tracking_uri)
