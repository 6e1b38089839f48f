"""ONNX export of registered rankers: checked against the native model on real rows, loud on a
tampered graph; and the Triton configs the repository writes.

Both rankers are trained small on a slice of the real log and registered in a real MLflow (SQLite
in a temporary folder); the native side is ``models.registry.load_ranker``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest

from core.schema import HEADS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir
from tests.dev_frame import build_dev_frame
from models.features import feature_matrix
from models.heavy_ranker import HeavyRankerParams
from models.light_ranker import LightRankerParams
from models.registry import RankerNotFoundError, load_ranker
from models.split import split_by_days
from models.train import train_heavy, train_light
from serving import export as E

SMALL_LIGHT = LightRankerParams(num_threads=1, num_boost_round=40)
SMALL_HEAVY = HeavyRankerParams(max_epochs=2, num_threads=1, hidden=(32, 16), tower=8)


@pytest.fixture(scope="module")
def frames(data_dir):
    return split_by_days(build_dev_frame(data_dir, user_sample_mod=20), valid_days=2)


@pytest.fixture(scope="module")
def registry(frames, tmp_path_factory):
    """A state folder whose MLflow registry holds light_ranker v1 and heavy_ranker v1 (champions)."""
    state = StateDir(tmp_path_factory.mktemp("export-state")).ensure()
    train, valid = frames
    train_light(train, valid, state, params=SMALL_LIGHT)
    train_heavy(train, valid, state, params=SMALL_HEAVY)
    return state


@pytest.fixture(scope="module")
def check_rows(frames):
    valid = frames[1]
    return valid.sample(n=min(1500, len(valid)), random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def exports(registry, check_rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    uri = registry.mlflow_tracking_uri
    return {name: E.export_onnx(name, "champion", uri, out / name, check_rows)
            for name in (LIGHT_RANKER_NAME, HEAVY_RANKER_NAME)}


@pytest.mark.parametrize("name,heads", [(LIGHT_RANKER_NAME, ("engaged",)), (HEAVY_RANKER_NAME, HEADS)])
def test_export_matches_native_on_real_rows(name, heads, exports, registry, check_rows):
    res = exports[name]
    native = load_ranker(name, tracking_uri=registry.mlflow_tracking_uri)
    assert (res.version, res.run_id, res.heads) == (native.version, native.run_id, tuple(heads))
    assert res.path.name == "model.onnx" and res.path.exists()
    assert res.max_abs_diff <= 1e-5 and res.rows_checked == len(check_rows)

    model = onnx.load(str(res.path))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert (inp.name, out.name) == ("features", "probabilities")
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", len(native.feature_names)]
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", len(heads)]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["registered_model"] == name and props["version"] == str(native.version)
    assert props["run_id"] == native.run_id and props["alias"] == "champion"
    assert json.loads(props["feature_names"]) == list(native.feature_names)
    assert json.loads(props["heads"]) == list(heads)

    # independent of the exporter's own check: real rows with their NaN, one row, and ±inf
    x = feature_matrix(check_rows, native.feature_names)
    assert np.isnan(x).any(), "the real rows should exercise missing values"
    session = E.onnx_session(res.path)
    got = session.run(["probabilities"], {"features": x})[0]
    want = native.predict(check_rows)
    assert got.shape == want.shape == (len(x), len(heads))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(session.run(None, {"features": x[:1]})[0], want[:1], rtol=0, atol=1e-5)
    with_inf = x[:5].copy()
    with_inf[:, 0] = np.inf
    as_nan = pd.DataFrame(np.where(np.isinf(with_inf), np.nan, with_inf), columns=list(native.feature_names))
    np.testing.assert_allclose(session.run(None, {"features": with_inf})[0], native.predict(as_nan), rtol=0, atol=1e-5)


def test_light_output_is_positive_class_probability(exports, registry, check_rows):
    native = load_ranker(LIGHT_RANKER_NAME, tracking_uri=registry.mlflow_tracking_uri)
    x = feature_matrix(check_rows, native.feature_names)
    p = E.onnx_session(exports[LIGHT_RANKER_NAME].path).run(None, {"features": x})[0][:, 0]
    raw = native.model.predict(x.astype(np.float64))  # LightGBM's P(class 1)
    np.testing.assert_allclose(p, raw, rtol=0, atol=1e-5)
    assert 0 < p.min() and p.max() < 1


def _tamper_light(model: onnx.ModelProto) -> onnx.ModelProto:
    node = next(n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier")
    attr = next(a for a in node.attribute if a.name == "class_weights")
    attr.floats[:] = [w + 0.5 for w in attr.floats]  # every leaf of every tree shifted
    return model


def _tamper_heavy(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnx import numpy_helper

    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight matrix
    w = numpy_helper.to_array(init).copy()
    w.flat[::7] += 0.3
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    return model


@pytest.mark.parametrize("name,tamper", [(LIGHT_RANKER_NAME, _tamper_light), (HEAVY_RANKER_NAME, _tamper_heavy)])
def test_tampered_model_fails_loudly(name, tamper, exports, registry, check_rows):
    native = load_ranker(name, tracking_uri=registry.mlflow_tracking_uri)
    model = tamper(onnx.load(str(exports[name].path)))
    with pytest.raises(E.ExportMismatchError) as err:
        E.verify_onnx(model, native, check_rows)
    assert err.value.max_abs_diff > 1e-5
    assert err.value.head in native.heads
    assert "differs from the native model" in str(err.value) and f"{err.value.max_abs_diff:.3e}" in str(err.value)


def test_mismatch_writes_nothing(registry, check_rows, tmp_path, monkeypatch):
    real = E.to_onnx
    monkeypatch.setattr(E, "to_onnx", lambda source, alias=None: _tamper_light(real(source, alias)))
    with pytest.raises(E.ExportMismatchError):
        E.export_onnx(LIGHT_RANKER_NAME, "champion", registry.mlflow_tracking_uri, tmp_path / "out", check_rows)
    assert not list(tmp_path.rglob("*.onnx*"))


def test_bad_requests_say_what_is_wrong(registry, check_rows, tmp_path):
    uri = registry.mlflow_tracking_uri
    with pytest.raises(RankerNotFoundError, match="no alias 'challenger'"):
        E.export_onnx(LIGHT_RANKER_NAME, "challenger", uri, tmp_path, check_rows)
    with pytest.raises(RankerNotFoundError, match="no MLflow store"):
        E.export_onnx(LIGHT_RANKER_NAME, "champion", f"sqlite:///{tmp_path / 'none.db'}", tmp_path, check_rows)
    with pytest.raises(ValueError, match="check_rows is empty"):
        E.export_onnx(LIGHT_RANKER_NAME, "champion", uri, tmp_path, check_rows.iloc[:0])
    with pytest.raises(ValueError, match="check_rows is required"):
        E.export_onnx(LIGHT_RANKER_NAME, "champion", uri, tmp_path, None)


def test_check_matrix_adds_missing_value_rows(check_rows):
    names = ("user_click_rate", "post_duration_ms", "ua_engagements")
    x = E.check_matrix(check_rows, names)
    n = len(check_rows)
    assert x.shape == (n + len(names) + 2, len(names)) and x.dtype == np.float32
    assert np.isnan(np.diag(x[n:n + len(names)])).all()
    assert np.isnan(x[n + len(names)]).all() and np.isinf(x[-1]).all()


# ---------------------------------------------------------------- Triton configs


def _parse_config(text: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_render_config_is_valid_triton_config(backend):
    from serving.triton.repository import RepositorySettings, render_config

    settings = RepositorySettings(max_batch_size=4096, max_queue_delay_us=250, intra_op_threads=2)
    cfg = _parse_config(render_config("heavy_ranker", 42, 7, [3, 1, 3], settings, backend=backend))
    assert cfg.name == "heavy_ranker" and cfg.backend == backend and cfg.max_batch_size == 4096
    assert [(i.name, list(i.dims)) for i in cfg.input] == [("features", [42])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("probabilities", [7])]
    assert cfg.input[0].data_type == cfg.output[0].data_type == 11  # TYPE_FP32
    assert list(cfg.version_policy.specific.versions) == [1, 3]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    threads = "intra_op_threads" if backend == "python" else "intra_op_thread_count"
    assert cfg.parameters[threads].string_value == "2"


def test_render_config_rejects_bad_input():
    from serving.triton.repository import render_config

    with pytest.raises(ValueError, match="at least one version"):
        render_config("m", 3, 1, [])
    with pytest.raises(ValueError, match="unknown backend"):
        render_config("m", 3, 1, [1], backend="tensorrt")


def test_sync_repository_writes_versions_and_skips_present_exports(registry, check_rows, tmp_path):
    from serving.triton.repository import sync_repository

    uri, repo = registry.mlflow_tracking_uri, tmp_path / "repo"
    first = sync_repository(uri, repo, check_rows)
    for name, n_heads in ((LIGHT_RANKER_NAME, 1), (HEAVY_RANKER_NAME, len(HEADS))):
        s = first[name]
        assert s.served == (1,) and s.aliases == {"champion": 1} and len(s.exported) == 1
        assert {p.name for p in (repo / name / "1").iterdir()} == {"model.onnx", "model.py"}
        cfg = _parse_config((repo / name / "config.pbtxt").read_text())
        assert list(cfg.version_policy.specific.versions) == [1] and list(cfg.output[0].dims) == [n_heads]
        ort_cfg = _parse_config((repo / name / "config.onnxruntime.pbtxt").read_text())
        assert ort_cfg.backend == "onnxruntime"
        assert (repo / name / "configs" / "onnxruntime.pbtxt").read_text() == (repo / name / "config.onnxruntime.pbtxt").read_text()

    def no_rows():
        raise AssertionError("nothing to export: the check rows must not be loaded")

    second = sync_repository(uri, repo, no_rows)
    assert all(not s.changed and s.served == (1,) for s in second.values())


def test_sync_serves_challenger_and_keeps_the_previous_version_for_rollback(registry, frames, check_rows, tmp_path):
    from mlflow import MlflowClient

    from serving.triton.repository import RepositorySettings, read_manifest, sync_repository

    uri, repo = registry.mlflow_tracking_uri, tmp_path / "repo"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    sync_repository(uri, repo, check_rows, models=[LIGHT_RANKER_NAME])
    v2 = train_light(*frames, registry, set_champion=False,
                     params=LightRankerParams(num_threads=1, num_boost_round=10, seed=3)).model_version
    client.set_registered_model_alias(LIGHT_RANKER_NAME, "challenger", str(v2))
    try:
        s = sync_repository(uri, repo, check_rows, models=[LIGHT_RANKER_NAME])[LIGHT_RANKER_NAME]
        assert s.aliases == {"champion": 1, "challenger": v2} and s.served == (1, v2)
        assert [e.version for e in s.exported] == [v2] and s.exported[0].alias == "challenger"
        cfg = _parse_config((repo / LIGHT_RANKER_NAME / "config.pbtxt").read_text())
        assert list(cfg.version_policy.specific.versions) == [1, v2]

        # challenger dropped: v2 stays served once for rollback, then goes with keep_rollback=0
        client.delete_registered_model_alias(LIGHT_RANKER_NAME, "challenger")
        s = sync_repository(uri, repo, check_rows, models=[LIGHT_RANKER_NAME])[LIGHT_RANKER_NAME]
        assert s.aliases == {"champion": 1} and s.served == (1, v2) and not s.changed
        s = sync_repository(uri, repo, check_rows, models=[LIGHT_RANKER_NAME],
                            settings=RepositorySettings(keep_rollback=0))[LIGHT_RANKER_NAME]
        assert s.served == (1,) and read_manifest(repo / LIGHT_RANKER_NAME)["served"] == [1]
        assert (repo / LIGHT_RANKER_NAME / str(v2) / "model.onnx").exists()  # files stay for a later rollback
    finally:  # the module's registry is shared: leave no challenger behind
        if "challenger" in client.get_registered_model(LIGHT_RANKER_NAME).aliases:
            client.delete_registered_model_alias(LIGHT_RANKER_NAME, "challenger")


# ---------------------------------------------------------------- the heavy ranker in ONNX Runtime, in process


def _heavy_with_program(registry):
    from models.registry import alias_version, load_ranker_version

    uri = registry.mlflow_tracking_uri
    version = alias_version(HEAVY_RANKER_NAME, tracking_uri=uri)
    plain = load_ranker(HEAVY_RANKER_NAME, tracking_uri=uri)
    return plain, (lambda: load_ranker_version(HEAVY_RANKER_NAME, version, uri, with_program=True).program)


def test_heavy_ranker_in_onnx_runtime_is_exported_once_then_read_back(registry, check_rows, tmp_path):
    """``heavy_ranker.backend: onnx``: the first load exports and checks, a later load (a restart, a
    second worker) reads the cached file without touching the program, and both score as torch."""
    import dataclasses

    from mixer.config import HeavyRankerSettings
    from mixer.scorers.heavy_backend import heavy_ranker_backend
    from serving.onnx_ranker import MAX_ABS_DIFF

    plain, program = _heavy_with_program(registry)
    settings = HeavyRankerSettings(cache_dir=str(tmp_path))
    calls = []

    def counted():
        calls.append(1)
        return program()

    fast = heavy_ranker_backend(plain, settings, counted)
    assert fast.engine == "onnxruntime" and plain.engine == "torch" and calls == [1]
    assert not fast.compiled.from_cache and fast.compiled.max_abs_diff <= MAX_ABS_DIFF
    (cached,) = tmp_path.glob(f"{HEAVY_RANKER_NAME}-v{plain.version}-*.onnx")
    assert fast.compiled.path == cached
    props = {p.key: p.value for p in onnx.load(str(cached)).metadata_props}
    assert props["run_id"] == plain.run_id and float(props["check_max_abs_diff"]) <= MAX_ABS_DIFF

    def no_export():
        raise AssertionError("a cached version must not be exported again")

    again = heavy_ranker_backend(plain, settings, no_export)
    assert again.engine == "onnxruntime" and again.compiled.from_cache and again.compiled.path == cached
    ours, theirs = again.predict(check_rows), plain.predict(check_rows)
    assert ours.shape == theirs.shape == (len(check_rows), len(HEADS))
    assert np.abs(ours.astype(np.float64) - theirs).max() <= MAX_ABS_DIFF
    assert heavy_ranker_backend(plain, HeavyRankerSettings(backend="torch"), no_export) is plain
    # another registered version (a retrain: new run id) never reads this file
    other = dataclasses.replace(plain, run_id="0" * 32)
    assert heavy_ranker_backend(other, settings, program).compiled.path != cached


def test_heavy_ranker_onnx_replaces_a_bad_file_and_falls_back_to_torch_on_a_bad_export(registry, tmp_path, caplog,
                                                                                          monkeypatch):
    """A half-written or altered cached file is exported again; an export that scores differently
    from torch, and a version without a program, leave torch scoring, with a warning saying why."""
    from mixer.config import HeavyRankerSettings
    from mixer.scorers.heavy_backend import heavy_ranker_backend
    from serving import onnx_ranker
    from serving.onnx_ranker import OnnxLoadError, load_checked

    plain, program = _heavy_with_program(registry)
    settings = HeavyRankerSettings(cache_dir=str(tmp_path))
    path = heavy_ranker_backend(plain, settings, program).compiled.path
    good = path.read_bytes()

    for bad in (good[: len(good) // 3], _tamper_heavy(onnx.load(str(path))).SerializeToString()):
        path.write_bytes(bad)
        fixed = heavy_ranker_backend(plain, settings, program)
        assert fixed.engine == "onnxruntime" and not fixed.compiled.from_cache and path.read_bytes() == good

    real = onnx_ranker.to_onnx
    monkeypatch.setattr(onnx_ranker, "to_onnx", lambda h, alias=None: _tamper_heavy(real(h, alias)))
    path.write_bytes(_tamper_heavy(onnx.load(str(path))).SerializeToString())
    with caplog.at_level("WARNING", logger="serving.onnx_ranker"):
        kept = heavy_ranker_backend(plain, settings, program)
    assert kept is plain and kept.engine == "torch"
    assert "scores with torch" in caplog.text and "differs from the native model" in caplog.text

    path.unlink()
    with pytest.raises(OnnxLoadError, match="no torch.export program"):
        load_checked(plain, tmp_path, None, lambda: None)
    assert not path.exists()
