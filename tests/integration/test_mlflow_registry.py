"""Train both rankers on a slice of the real log, register them in a real MLflow (SQLite) store,
load them back by alias, promote, and evaluate."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.schema import (
    CHAMPION_ALIAS, HEADS, HEAVY_RANKER_FEATURES, HEAVY_RANKER_NAME, LIGHT_RANKER_FEATURES, LIGHT_RANKER_NAME,
)
from core.state import StateDir
from tests.dev_frame import build_dev_frame
from models.evaluate import EXAMPLE_WEIGHTS, ORDERINGS, evaluate_rankers, impression_gain
from models.metrics import ndcg_at_k
from models.features import MissingFeaturesError
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import EXPERIMENT_NAME, RankerNotFoundError, load_ranker, mlflow_uris, promote
from models.split import split_by_days
from models.train import train_heavy, train_light

pytestmark = pytest.mark.integration

# one thread each: robust when other processes share the 2 cores (two OpenMP threads waiting on a
# descheduled sibling slow training down many times over)
HEAVY_PARAMS = HeavyRankerParams(max_epochs=6, num_threads=1)
LIGHT_PARAMS = LightRankerParams(num_threads=1)


@pytest.fixture(scope="module")
def frames(data_dir):
    return split_by_days(build_dev_frame(data_dir, user_sample_mod=6), valid_days=2)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    return StateDir(tmp_path_factory.mktemp("mlflow-state")).ensure()


@pytest.fixture(scope="module")
def trained(frames, state):
    env_before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    train, valid = frames
    light = train_light(train, valid, state, params=LIGHT_PARAMS)
    heavy = train_heavy(train, valid, state, params=HEAVY_PARAMS)
    # MLflow's fluent API must not leak the test store into the process environment
    assert {k: os.environ.get(k) for k in env_before} == env_before
    return light, heavy


def _client(state):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=state.mlflow_tracking_uri, registry_uri=state.mlflow_tracking_uri)


def test_runs_log_params_metrics_and_artifacts(trained, state):
    client = _client(state)
    exp = client.get_experiment_by_name(EXPERIMENT_NAME)
    assert exp.artifact_location == state.mlflow_artifacts.resolve().as_uri()
    for result, heads in ((trained[0], ("engaged",)), (trained[1], HEADS)):
        run = client.get_run(result.run_id)
        assert run.info.experiment_id == exp.experiment_id
        for head in heads:
            for metric in ("auc", "gauc", "log_loss", "ece"):
                key = f"valid_{head}_{metric}"
                if math.isfinite(result.metrics[key]):
                    assert run.data.metrics[key] == pytest.approx(result.metrics[key])
        assert "fit_rows" in run.data.params and "valid_days" in run.data.params
        names = {a.path for a in client.list_artifacts(result.run_id)}
        assert {"features.json", "metrics.json"} <= names
    heavy = trained[1]
    assert heavy.metrics["valid_click_auc"] > 0.6
    assert heavy.metrics["valid_like_ece"] < heavy.metrics["valid_like_ece_uncalibrated"]
    local = client.download_artifacts(heavy.run_id, "features.json", str(state.root))
    assert json.loads(Path(local).read_text())["feature_names"] == list(HEAVY_RANKER_FEATURES)


def test_models_pin_only_runtime_requirements(trained, state):
    import mlflow.artifacts

    lock = (Path(__file__).resolve().parents[2] / "requirements.lock").read_text()
    for name in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME):
        with mlflow_uris(state.mlflow_tracking_uri):  # models:/ resolution reads the global URI
            reqs = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/1/requirements.txt", dst_path=str(state.root / name),
            )).read_text().split()
        pkgs = {r.split("==")[0] for r in reqs}
        assert not pkgs & {"pytest", "scikit-learn", "pyspark", "feast"}, reqs
        assert {"numpy", "pandas"} <= pkgs
        for r in reqs:
            pkg, version = r.split("==")
            if pkg != "mlflow":
                assert f"{pkg}=={version}" in lock  # the lock's exact version (local label dropped)


def test_load_by_alias_predicts_like_the_in_memory_models(trained, frames, state):
    _, valid = frames
    light_res, heavy_res = trained
    light = load_ranker(LIGHT_RANKER_NAME, CHAMPION_ALIAS, state.mlflow_tracking_uri)
    heavy = load_ranker(HEAVY_RANKER_NAME, tracking_uri=state.mlflow_tracking_uri)
    assert (light.version, light.run_id) == (light_res.model_version, light_res.run_id) == (1, light_res.run_id)
    assert (heavy.version, heavy.run_id) == (1, heavy_res.run_id)
    assert light.feature_names == LIGHT_RANKER_FEATURES and light.heads == ("engaged",)
    assert heavy.feature_names == HEAVY_RANKER_FEATURES and heavy.heads == HEADS

    frame = valid.sample(2000, random_state=0)
    lp, hp = light.predict(frame), heavy.predict(frame)
    assert lp.shape == (2000, 1) and hp.shape == (2000, 7) and lp.dtype == hp.dtype == np.float32
    np.testing.assert_allclose(lp, light_res.model.predict(frame), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(hp, heavy_res.model.predict(frame), rtol=1e-5, atol=1e-6)
    # one row, no rows, and all-missing features work through the exported graph too
    assert heavy.predict(frame.head(1)).shape == (1, 7)
    assert heavy.predict(frame.head(0)).shape == (0, 7)
    nan_frame = frame.head(3).copy()
    nan_frame[list(HEAVY_RANKER_FEATURES)] = np.nan
    assert np.isfinite(heavy.predict(nan_frame)).all()
    with pytest.raises(MissingFeaturesError, match="user_click_rate"):
        light.predict(frame.drop(columns="user_click_rate"))


def test_one_load_path_by_version_alias_and_for_export(trained, frames, state):
    """Alias -> version -> download -> loader of the kind: the same handle whichever way it is asked."""
    import torch

    from models.registry import (
        LOADERS, alias_version, load_ranker_version, model_aliases, registered_version,
    )

    _, valid = frames
    uri = state.mlflow_tracking_uri
    light_res, heavy_res = trained
    assert model_aliases(HEAVY_RANKER_NAME, uri)[CHAMPION_ALIAS] == alias_version(HEAVY_RANKER_NAME, tracking_uri=uri) == 1
    assert registered_version(HEAVY_RANKER_NAME, 1, uri).run_id == heavy_res.run_id
    assert set(LOADERS) == {"light", "heavy"} and LOADERS["heavy"].flavor == "pytorch"

    by_alias = load_ranker(HEAVY_RANKER_NAME, tracking_uri=uri)
    by_version = load_ranker_version(HEAVY_RANKER_NAME, 1, uri, with_program=True)
    assert (by_alias.alias, by_version.alias) == (CHAMPION_ALIAS, "")
    assert by_alias.program is None and isinstance(by_version.program, torch.export.ExportedProgram)
    frame = valid.head(200)
    np.testing.assert_array_equal(by_alias.predict(frame), by_version.predict(frame))
    light = load_ranker_version(LIGHT_RANKER_NAME, 1, uri, with_program=True)
    assert light.kind == "light" and light.program is None and light.run_id == light_res.run_id
    with pytest.raises(RankerNotFoundError, match="no version 42.*home-mixer train"):
        load_ranker_version(LIGHT_RANKER_NAME, 42, uri)
    with pytest.raises(RankerNotFoundError, match="no registered model 'tiny_ranker'"):
        model_aliases("tiny_ranker", uri)


def test_versions_not_logged_as_rankers_are_refused_with_what_to_do(trained, frames, state):
    """A version without ranker metadata, or whose kind does not match its flavour, is not loaded."""
    import lightgbm
    import mlflow
    import mlflow.lightgbm

    from models.registry import ensure_experiment, load_ranker_version

    train, _ = frames
    uri = state.mlflow_tracking_uri
    x = train[list(LIGHT_RANKER_FEATURES)].head(300).to_numpy(dtype=np.float32)
    booster = lightgbm.train({"objective": "binary", "verbose": -1, "num_threads": 1},
                             lightgbm.Dataset(x, label=(np.arange(len(x)) % 2)), num_boost_round=2)
    with mlflow_uris(uri):
        with mlflow.start_run(experiment_id=ensure_experiment(uri, state.mlflow_artifacts)):
            mlflow.lightgbm.log_model(booster, name="model", registered_model_name="plain_booster")
            mlflow.lightgbm.log_model(booster, name="model", registered_model_name="mislabelled_booster",
                                      metadata={"ranker": "heavy", "feature_names": list(LIGHT_RANKER_FEATURES),
                                                "heads": list(HEADS)})
    with pytest.raises(ValueError, match="no ranker metadata.*home-mixer train"):
        load_ranker_version("plain_booster", 1, uri)
    with pytest.raises(ValueError, match="heavy ranker but was logged without the 'pytorch' flavour"):
        load_ranker_version("mislabelled_booster", 1, uri)


def test_promote_moves_the_alias(trained, frames, state):
    train, valid = frames
    uri = state.mlflow_tracking_uri
    challenger = train_light(train, valid, state, set_champion=False, params=LIGHT_PARAMS)
    assert challenger.model_version == 2
    assert load_ranker(LIGHT_RANKER_NAME, tracking_uri=uri).version == 1  # champion untouched
    promote(LIGHT_RANKER_NAME, 2, "challenger", tracking_uri=uri)
    assert load_ranker(LIGHT_RANKER_NAME, "challenger", uri).version == 2
    promote(LIGHT_RANKER_NAME, 2, tracking_uri=uri)
    champion = load_ranker(LIGHT_RANKER_NAME, tracking_uri=uri)
    assert (champion.version, champion.run_id) == (2, challenger.run_id)
    np.testing.assert_allclose(champion.predict(valid.head(100)), challenger.model.predict(valid.head(100)),
                               rtol=1e-6, atol=1e-7)
    promote(LIGHT_RANKER_NAME, 1, tracking_uri=uri)
    assert load_ranker(LIGHT_RANKER_NAME, tracking_uri=uri).version == 1
    with pytest.raises(RankerNotFoundError, match="no version 9"):
        promote(LIGHT_RANKER_NAME, 9, tracking_uri=uri)


def test_missing_model_alias_or_store_is_a_clear_error(trained, state, tmp_path):
    uri = state.mlflow_tracking_uri
    with pytest.raises(RankerNotFoundError, match="no alias 'canary'.*home-mixer train"):
        load_ranker(HEAVY_RANKER_NAME, "canary", uri)
    with pytest.raises(RankerNotFoundError, match="no registered model 'tiny_ranker'.*home-mixer train"):
        load_ranker("tiny_ranker", tracking_uri=uri)
    missing_db = tmp_path / "nothing" / "mlflow.db"
    with pytest.raises(RankerNotFoundError, match="home-mixer train"):
        load_ranker(LIGHT_RANKER_NAME, tracking_uri=f"sqlite:///{missing_db}")
    assert not missing_db.exists()  # looking did not create a store


def test_unregistered_training_run_leaves_the_registry_alone(frames, state):
    train, valid = frames
    client = _client(state)
    before = len(client.search_model_versions(f"name='{LIGHT_RANKER_NAME}'"))
    result = train_light(train, valid, state, register=False, params=LIGHT_PARAMS)
    assert result.model_version is None and client.get_run(result.run_id).info.status == "FINISHED"
    assert len(client.search_model_versions(f"name='{LIGHT_RANKER_NAME}'")) == before


def test_evaluate_rankers_reports_heads_and_orderings(trained, frames, state):
    _, valid = frames
    light_res, heavy_res = trained
    report = evaluate_rankers(valid, EXAMPLE_WEIGHTS, state.mlflow_tracking_uri)
    # same models, same frame: the report agrees with the training runs' validation metrics
    for head in HEADS:
        assert report.head_metrics["heavy"][head]["auc"] == pytest.approx(
            heavy_res.metrics[f"valid_{head}_auc"], abs=1e-6)
        assert report.head_metrics["light"][head]["auc"] == pytest.approx(
            light_res.metrics[f"valid_{head}_auc"], abs=1e-6)
    assert set(report.ndcg) == set(ORDERINGS)
    assert all(0 < v <= 1 for v in report.ndcg.values())
    for head in HEADS:  # the training runs logged the same request GAUC
        assert report.head_metrics["heavy"][head]["request_gauc"] == pytest.approx(
            heavy_res.metrics[f"valid_{head}_request_gauc"], abs=1e-6, nan_ok=True)
    assert 0 < report.requests_with_gain <= report.requests and report.users <= report.requests
    # the blended order carries signal inside requests: it beats its own reverse on engagement gain
    # (the margin over chronological order on this small dev sample depends on the training seed)
    heavy = load_ranker(HEAVY_RANKER_NAME, "champion", state.mlflow_tracking_uri)
    blended = heavy.predict(valid).astype(float) @ np.array([EXAMPLE_WEIGHTS[h] for h in heavy.heads], dtype=float)
    multi = valid["request_id"].map(valid["request_id"].value_counts()).to_numpy() >= 2
    gain = impression_gain(valid, EXAMPLE_WEIGHTS)[multi]
    groups = valid["request_id"].to_numpy()[multi]
    assert report.ndcg["blended"] == pytest.approx(ndcg_at_k(gain, blended[multi], groups, 10))
    assert report.ndcg["blended"] > ndcg_at_k(gain, -blended[multi], groups, 10)
    path = report.to_json(state.reports / "eval.json")
    assert json.loads(path.read_text())["rows"] == len(valid)
    assert "blended" in report.to_table()


def test_ablation_table_is_logged_in_the_heavy_run(frames, state):
    import mlflow

    from core.schema import FEATURE_GROUPS

    train, valid = frames
    fast = HeavyRankerParams(hidden=(16,), tower=8, max_epochs=2, patience=1, num_threads=1)
    result = train_heavy(train, valid, state, register=False, params=fast, ablation=True, log=lambda line: None)
    table = result.ablation
    # attention is off by default: its group is compared by turning it on, the others by removal
    assert not fast.sequence_attention
    assert table["variant"].tolist() == ["all", *(("+" if g == "sequence_attention" else "-") + g for g in FEATURE_GROUPS),
                                         "seed spread"]
    with mlflow_uris(state.mlflow_tracking_uri):
        raw = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/ablation.json")  # log_table's JSON
    logged = pd.DataFrame(raw["data"], columns=raw["columns"])
    assert logged["variant"].tolist() == table["variant"].tolist()
    np.testing.assert_allclose(logged["click_request_gauc"].to_numpy(float), table["click_request_gauc"].to_numpy(float))
    # the full row is the run's own validation metric
    assert table.loc[0, "click_request_gauc"] == pytest.approx(result.metrics["valid_click_request_gauc"])


def test_reference_profile_travels_with_the_version_and_gates_drift(frames, state, trained, tmp_path, capsys):
    from home_mixer.cli import main
    from home_mixer.drift_job import profile_training_window, run_drift
    from monitoring.reference import ReferenceNotFoundError, load_reference, score_column
    from pipelines.training_set import TRAINING_SET_TABLE

    train, valid = frames
    heavy = trained[1]
    with pytest.raises(ReferenceNotFoundError, match="retrain"):
        load_reference(state.mlflow_tracking_uri, version=heavy.model_version)
    profile = profile_training_window(state, heavy.run_id, train, heavy.model)
    reference, version = load_reference(state.mlflow_tracking_uri)
    assert version == heavy.model_version and reference.profile == profile
    np.testing.assert_allclose(reference.sample[score_column("click")].mean(),
                               profile["heads"]["click"]["mean"], rtol=1e-9)
    # the drift job on the state's validation days against that reference
    pd.concat([train, valid]).to_parquet(state.table(TRAINING_SET_TABLE), index=False)
    run = run_drift(state, out_dir=tmp_path / "drift")
    assert run.html.exists() and json.loads(run.json.read_text())["drift_share"] == run.summary.drift_share
    assert run.summary.current["rows"] == len(valid)
    # features accumulated from the log are compared with the day before the window
    assert run.summary.reference["recent"]["rows"] > 0
    assert {c.against for c in run.summary.features} == {"training", "recent"}
    # the CLI exits 3 when the gate fails, 0 when it passes
    gate = run.summary.drift_share
    assert main(["--state", str(state.root), "monitor", "drift", "--max-drift-share", str(max(gate - 0.01, 0)),
                 "--out", str(tmp_path / "cli")]) == (3 if gate > 0 else 0)
    assert main(["--state", str(state.root), "monitor", "drift", "--max-drift-share", "1.0",
                 "--out", str(tmp_path / "cli2")]) == 0
    assert "drift share" in capsys.readouterr().out
