"""``light_ranker.backend``: the mixer's light ranker compiled (checked on feature-log rows) or LightGBM."""

from __future__ import annotations

import dataclasses

import numpy as np

from core import online_layout as keys
from core.feature_log import FEATURE_SCHEMA_ID, encode_rows
from core.schema import ALL_FEATURES
from mixer.config import LightRankerSettings
from mixer.scorers.light_backend import light_ranker_backend, served_feature_rows
from models import compiled_light
from tests.unit.test_compiled_light import _booster, _handle


def _log_rows(client, rows: np.ndarray, schema: str = FEATURE_SCHEMA_ID) -> None:
    for row in encode_rows(rows):
        client.xadd(keys.SERVED_FEATURES, {"features": row, "schema": schema, "post_id": 1})


def test_served_rows_are_the_newest_feature_log_rows(redis_client):
    assert served_feature_rows(redis_client, 10) is None  # no log yet
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(30, len(ALL_FEATURES)))
    rows[rows > 1.5] = np.nan
    _log_rows(redis_client, rows)
    got = served_feature_rows(redis_client, 10)
    assert list(got.columns) == list(ALL_FEATURES)
    np.testing.assert_array_equal(got.to_numpy(), rows[::-1][:10])  # newest first, NaN kept
    assert served_feature_rows(redis_client, 0) is None
    redis_client.delete(keys.SERVED_FEATURES)
    _log_rows(redis_client, rows[:3], schema="an-older-schema")  # columns would be misread: not used
    assert served_feature_rows(redis_client, 10) is None


def test_backend_lightgbm_keeps_the_handle_and_compiled_checks_on_logged_rows(redis_client, tmp_path, monkeypatch):
    # the test booster's six inputs, named as six of the schema's features (what the log holds)
    handle = dataclasses.replace(_handle(_booster(1)), feature_names=tuple(ALL_FEATURES[:6]))
    assert light_ranker_backend(handle, LightRankerSettings(backend="lightgbm"), redis_client) is handle
    assert not list(tmp_path.iterdir())

    rows = np.random.default_rng(1).normal(size=(5, len(ALL_FEATURES)))
    rows[0, 2] = np.nan
    _log_rows(redis_client, rows)
    seen = {}
    real = compiled_light.compile_checked

    def spy(booster, cache_dir, label, check_rows=None):
        seen.update(cache_dir=cache_dir, label=label, check_rows=check_rows)
        return real(booster, cache_dir, label, check_rows)

    monkeypatch.setattr(compiled_light, "compile_checked", spy)
    fast = light_ranker_backend(handle, LightRankerSettings(cache_dir=str(tmp_path)), redis_client)
    assert fast.engine == "lleaves" and seen["cache_dir"] == tmp_path and seen["label"] == "light_ranker-v1"
    # the check ran on the logged rows, in the model's column order
    np.testing.assert_array_equal(seen["check_rows"], rows[::-1, :6].astype(np.float32))
    light_ranker_backend(handle, LightRankerSettings(cache_dir=str(tmp_path), check_rows=0), redis_client)
    assert seen["check_rows"] is None
