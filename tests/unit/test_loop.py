"""The model updater's triggers and settings (home_mixer/loop.py); its cycle runs in simulation in
tests/integration/test_mixer_api.py."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import ValidationError

from core import online_layout as keys
from core.state import StateDir
from home_mixer.loop import LoopSettings, ModelUpdater, load_loop_settings


def test_volume_drift_and_schedule_trigger_a_cycle(redis_client, tmp_path):
    state = StateDir(tmp_path / "state").ensure()
    config = tmp_path / "mixer.yaml"
    config.write_text("{}")
    updater = ModelUpdater(state, config, LoopSettings(min_new_serves=5, interval_s=100), redis_client)
    assert updater.trigger(now_s=1000.0) is None  # nothing logged, no drift run, no cycle yet
    for i in range(5):
        redis_client.xadd(keys.SERVED_FEATURES, {"i": i})
    assert updater.trigger(now_s=1000.0) == "volume"
    updater.checkpoint.parent.mkdir(parents=True)
    updater.checkpoint.write_text(json.dumps({"at": 1000.0, "logged": 5}))
    assert updater.trigger(now_s=1050.0) is None  # the serves were trained on
    run = state.reports / "drift" / "20261206T120000Z"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"passed": False}))
    os.utime(run / "summary.json", (900.0, 900.0))
    assert updater.trigger(now_s=1050.0) is None  # that failed run is older than the last cycle...
    os.utime(run / "summary.json", (999.0, 999.0))
    updater.checkpoint.write_text(json.dumps({"at": 500.0, "logged": 5}))
    assert updater.trigger(now_s=550.0) == "drift"  # ...this one is newer
    (run / "summary.json").write_text(json.dumps({"passed": True}))
    os.utime(run / "summary.json", (999.0, 999.0))
    assert updater.trigger(now_s=550.0) is None
    assert updater.trigger(now_s=700.0) == "schedule"  # interval_s since the last cycle


def test_loop_settings_come_from_yaml_with_clear_errors(tmp_path):
    assert load_loop_settings(None) == LoopSettings()
    path = tmp_path / "loop.yaml"
    path.write_text("ramp_share: 0.2\nhead: long_view\n")
    assert load_loop_settings(path).ramp_share == 0.2
    path.write_text("ramp_shares: 0.2\n")
    with pytest.raises(ValidationError, match="ramp_shares"):
        load_loop_settings(path)
    path.write_text("ramp_share: 1.5\n")
    with pytest.raises(ValidationError, match="ramp_share"):
        load_loop_settings(path)
    path.write_text("- a list\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_loop_settings(path)
