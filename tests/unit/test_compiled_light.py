"""The light ranker compiled by lleaves: equal to LightGBM, cached per model, LightGBM when it cannot be.

Small boosters (20 trees, compiled in about a second) with NaN, a zero band and a categorical
feature, the cases where a compiler could disagree with LightGBM.
"""

from __future__ import annotations

import logging
import sys

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from models import compiled_light as C
from models.registry import RankerHandle, with_compiled_light

FEATURES = tuple(f"f{i}" for i in range(6))


def _booster(seed: int, rounds: int = 20) -> lgb.Booster:
    """Binary booster on 6 features: f0..f3 numeric with 20 % NaN, f4 mostly exact zeros, f5
    categorical (0..7)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(4000, 6))
    x[:, :4][rng.random((4000, 4)) < 0.2] = np.nan
    x[:, 4] = np.where(rng.random(4000) < 0.7, 0.0, x[:, 4])
    x[:, 5] = rng.integers(0, 8, 4000)
    logit = np.nan_to_num(x[:, 0]) - np.nan_to_num(x[:, 1]) ** 2 + 0.8 * np.isin(x[:, 5], (1, 3)) + (x[:, 4] == 0)
    y = (logit + rng.normal(size=4000) > 0.5).astype(int)
    params = {"objective": "binary", "num_leaves": 15, "min_data_in_leaf": 20, "num_threads": 1,
              "deterministic": True, "verbosity": -1, "seed": seed}
    data = lgb.Dataset(x.astype(np.float32), label=y, feature_name=list(FEATURES), categorical_feature=[5])
    booster = lgb.train(params, data, num_boost_round=rounds)
    booster.best_iteration = rounds - 2  # serving cuts at best_iteration: so must the compiled model
    return booster


@pytest.fixture(scope="module")
def booster() -> lgb.Booster:
    return _booster(1)


def _handle(booster, version=1) -> RankerHandle:
    return RankerHandle(name="light_ranker", alias="", version=version, run_id="", feature_names=FEATURES,
                        heads=("engaged",), kind="light", model=booster, num_threads=1)


def _rows(n: int, seed: int = 9) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6))
    x[:, :4][rng.random((n, 4)) < 0.3] = np.nan
    x[:, 4] = np.where(rng.random(n) < 0.5, 0.0, x[:, 4])
    x[:, 5] = rng.integers(-1, 10, n)  # unseen and negative categories too
    return pd.DataFrame(x, columns=list(FEATURES))


def test_compiled_scores_equal_lightgbm_on_thresholds_nan_zeros_and_categories(booster, tmp_path):
    rows = _rows(1000)
    plain = _handle(booster)
    fast = with_compiled_light(plain, tmp_path, check_rows=rows)
    assert fast.engine == "lleaves" and plain.engine == "lightgbm"
    assert fast.compiled.max_abs_diff <= C.MAX_ABS_DIFF
    ours, theirs = fast.predict(rows), plain.predict(rows)
    assert ours.shape == theirs.shape == (1000, 1) and ours.dtype == np.float32
    assert np.abs(ours.astype(np.float64) - theirs).max() <= C.MAX_ABS_DIFF
    assert 0.0 < ours.min() and ours.max() < 1.0  # probabilities (sigmoid applied), as LightGBM serves
    # the threshold rows sit on every split: each side of each threshold, NaN and the zero band
    boundary = C.boundary_rows(booster)
    assert np.isnan(boundary).any() and (boundary == 0).any()
    assert C.max_abs_diff(fast.compiled, booster, boundary) <= C.MAX_ABS_DIFF
    assert fast.predict(rows.iloc[:0]).shape == (0, 1)


def test_the_cache_is_reused_across_loads_and_keyed_by_model(booster, tmp_path, monkeypatch):
    first = C.compile_checked(booster, tmp_path, "light_ranker-v1")
    assert not first.from_cache and first.path.exists()
    stat = first.path.stat()
    import lleaves.compiler

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again instead of reading the cache")

    with monkeypatch.context() as m:  # a second load (a mixer restart) must not compile
        m.setattr(lleaves.compiler, "compile_to_module", no_compile)
        again = C.compile_checked(booster, tmp_path, "light_ranker-v1")
    assert again.from_cache and again.path == first.path
    assert (again.path.stat().st_mtime_ns, again.path.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    x = C.boundary_rows(booster)
    np.testing.assert_array_equal(again.predict(x), first.predict(x))
    # another model (a retrained version) never reads this one's code
    other = C.compile_checked(_booster(2, rounds=5), tmp_path, "light_ranker-v2")
    assert not other.from_cache and other.key != first.key and other.path != first.path
    assert sorted(p.name for p in tmp_path.glob("*.o")) == sorted([first.path.name, other.path.name])


@pytest.mark.parametrize("damage", ["garbage", "truncated", "no_digest"])
def test_a_damaged_cached_file_is_compiled_again_not_loaded(booster, tmp_path, damage):
    # LLVM aborts the process on a bad object file: it must never be handed one
    first = C.compile_checked(booster, tmp_path, "light_ranker-v1")
    code = first.path.read_bytes()
    if damage == "garbage":
        first.path.write_bytes(b"not an object file")
    elif damage == "truncated":  # a copy cut short
        first.path.write_bytes(code[: len(code) // 2])
    else:  # a writer stopped between the object and its digest
        C._digest_path(first.path).unlink()
    again = C.compile_checked(booster, tmp_path, "light_ranker-v1")
    assert not again.from_cache and again.max_abs_diff <= C.MAX_ABS_DIFF
    assert again.path.read_bytes() == code and C._verified(again.path)


def test_falls_back_to_lightgbm_when_compilation_fails(booster, tmp_path, monkeypatch, caplog):
    import lleaves.compiler

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: out of registers")

    monkeypatch.setattr(lleaves.compiler, "compile_to_module", broken)
    plain = _handle(booster)
    with caplog.at_level(logging.WARNING, logger="models.compiled_light"):
        handle = with_compiled_light(plain, tmp_path)
    assert handle is plain and handle.engine == "lightgbm"
    assert "scores with LightGBM" in caplog.text and "out of registers" in caplog.text
    assert not list(tmp_path.glob("*.o"))


def test_falls_back_when_the_equality_check_fails(booster, tmp_path, monkeypatch, caplog):
    real = C.CompiledLightRanker.predict

    def off_by_1e5(self, x, n_jobs=1):
        return real(self, x, n_jobs) + np.float32(1e-5)

    monkeypatch.setattr(C.CompiledLightRanker, "predict", off_by_1e5)
    with caplog.at_level(logging.WARNING, logger="models.compiled_light"):
        handle = with_compiled_light(_handle(booster), tmp_path, check_rows=_rows(50))
    assert handle.engine == "lightgbm"
    assert "differs from LightGBM" in caplog.text
    assert not list(tmp_path.glob("*.o*"))  # a wrong binary is not left for the next load


def test_falls_back_when_lleaves_is_missing(booster, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "lleaves", None)  # import lleaves -> ImportError
    with caplog.at_level(logging.WARNING, logger="models.compiled_light"):
        handle = with_compiled_light(_handle(booster), tmp_path)
    assert handle.engine == "lightgbm" and "not installed" in caplog.text
    rows = _rows(20)
    np.testing.assert_array_equal(handle.predict(rows), _handle(booster).predict(rows))


def test_only_the_light_ranker_compiles(booster, tmp_path):
    heavy = RankerHandle(name="heavy_ranker", alias="", version=1, run_id="", feature_names=FEATURES,
                         heads=("click",), kind="heavy", model=None)
    with pytest.raises(ValueError, match="only the light ranker"):
        with_compiled_light(heavy, tmp_path)
