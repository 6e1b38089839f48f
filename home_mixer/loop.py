"""The model updater (``home-mixer loop run``): retrain the heavy ranker from what the mixer served,
and let online traffic decide whether the new version replaces the champion.

One cycle, when a trigger fires (new labelled serves, the drift gate, or the schedule):

1. **Train** on the feature log (``pipelines.logged_features``: the rows the rankers saw, labelled
   by the impressions that followed), a sliding window of the newest ``window_serves`` labelled
   serves; the newest ``eval_fraction`` of its requests is held out. The new version is registered
   with the alias ``challenger``.
2. **Offline gate**: the existing promotion check (``models.promotion.compare_versions``: request
   GAUC per head on the held-out window) against the champion; a worse challenger stops here.
3. **Shadow**: the mixer's experiment gets ``shadow: {heavy_ranker: challenger}``
   (``mixer.side_effects.shadow_scoring``); the cycle goes on once the challenger has scored
   ``shadow_min_requests`` requests without failing.
4. **Ramp**: a ``challenger`` arm with ``ramp_share`` of users serves the challenger with the
   control arm's weights, in a new experiment ``loop-v<version>`` (its own salt and readout).
   After the phase the readout (``monitoring.experiment_report``) decides: SRM, a guardrail
   breach, or a lift on ``head`` whose 95 % interval lies below 0 rolls back; otherwise the
   champion alias moves to the challenger.
5. The mixer's experiment is restored (the running mixers serve it again within
   ``config_reload_interval_s``; a promoted champion within ``models.reload_interval_s``) and
   every decision is recorded as an MLflow run of experiment ``home-mixer-loop``.

The mixer follows the loop through its config file: the loop rewrites the file's ``experiment``
section, and the mixer serves a changed experiment without a restart (``mixer.config_watcher``).
Traffic during the shadow and ramp phases is whatever the mixer serves; ``drive`` waits for it
(``hold_s`` by default; a simulation drives simulated users instead and returns their engagements).
This is the train → shadow → canary → promote loop of continuous training (e.g. TFX's pusher
behind a model validator; Google's "ML Test Score", Breck et al. 2017), with the canary judged by
an online readout rather than offline metrics alone.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ConfigDict, Field

from core import online_layout as keys
from core.schema import HEADS, HEAVY_RANKER_NAME
from core.state import StateDir

log = logging.getLogger(__name__)

LOOP_EXPERIMENT = "home-mixer-loop"  # the MLflow experiment of the decisions
CHALLENGER_ALIAS = "challenger"


class LoopSettings(BaseModel):
    """The model updater's settings (``home-mixer loop run --config FILE``, YAML; defaults here)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_new_serves: int = Field(2000, ge=1)       # volume trigger: labelled serves logged since the last cycle
    interval_s: float = Field(86_400, gt=0)       # schedule trigger: at most this long between cycles
    drift_trigger: bool = True                    # the drift gate's last run failing triggers a cycle
    window_serves: int = Field(200_000, ge=100)   # the sliding window: newest labelled serves trained on
    eval_fraction: float = Field(0.2, gt=0, lt=1)  # newest share of the window's requests held out
    label_window_s: float = Field(3600, gt=0)     # an impression labels a serve within this many seconds
    shadow_share: float = Field(0.2, gt=0, le=1)
    shadow_min_requests: int = Field(50, ge=1)
    ramp_share: float = Field(0.1, gt=0, lt=1)
    head: str = "click"                           # the readout head that decides
    offline_gate: bool = True                     # the promotion check on the held-out window first
    max_p99_ratio: float = Field(1.2, gt=1)       # readout guardrail: the challenger arm's p99 over control's
    hold_s: float = Field(3600, gt=0)             # how long each phase waits for traffic (without a driver)
    # after a config change: the mixers' config and alias polls (5 s each), plus loading a new
    # challenger (with heavy_ranker.backend onnx its export, ~4-8 s the first time a version is
    # loaded, in every worker at once)
    settle_s: float = Field(25, ge=0)


@dataclass
class LoopDecision:
    """What one cycle decided, as recorded in MLflow.

    Attributes:
        trigger: "volume", "drift", "schedule" or "forced".
        decision: "promoted", "rolled_back" or "rejected_offline".
        reason: why, in words.
        champion_version, challenger_version: heavy ranker versions.
        metrics: offline GAUC per head of both, shadow counts, the readout's lift and users.
        run_id: the MLflow run.
    """

    trigger: str
    decision: str
    reason: str
    champion_version: int
    challenger_version: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    run_id: str = ""


def _default_drive(settings: LoopSettings) -> Callable[[str], pd.DataFrame | None]:
    def drive(phase: str) -> None:
        log.info("loop: %s phase, waiting %.0f s for traffic", phase, settings.hold_s)
        time.sleep(settings.hold_s)
        return None

    return drive


class ModelUpdater:
    """One mixer deployment's model updater (module docstring).

    Args:
        state: the state folder (MLflow, Redis, impressions table).
        mixer_config: the YAML file the mixers were started with (its ``experiment`` is rewritten).
        settings: the loop's settings.
        client: the online store (feature log, impression log, shadow log).
        drive: phase name ("shadow", "ramp") -> the engagements observed during it (an impressions
            frame), or None to read the state's impressions table; waits for the traffic.
        trainer: (train frame, eval frame) -> the registered challenger's ``TrainResult`` (default:
            ``models.train.train_heavy`` registering without the champion alias).
        impressions: the engagements that label the feature log (default: the state's table).
    """

    def __init__(self, state: StateDir, mixer_config: Path, settings: LoopSettings, client, *,
                 drive: Callable[[str], pd.DataFrame | None] | None = None, trainer=None,
                 impressions: Callable[[], pd.DataFrame] | None = None):
        self.state = state
        self.mixer_config = Path(mixer_config)
        self.settings = settings
        self.client = client
        self.drive = drive or _default_drive(settings)
        self.trainer = trainer or self._train_heavy
        self.impressions = impressions or (lambda: pd.read_parquet(state.table("impressions")))
        self.checkpoint = state.root / "loop" / "checkpoint.json"

    # ------------------------------------------------------------------ triggers
    def _read_checkpoint(self) -> dict:
        try:
            return json.loads(self.checkpoint.read_text())
        except (OSError, ValueError):
            return {}

    def trigger(self, now_s: float | None = None) -> str | None:
        """The trigger that fires now, or None: "volume" (``min_new_serves`` served rows logged
        since the last cycle), "drift" (the drift gate's newest run failed after the last cycle),
        "schedule" (``interval_s`` since the last cycle)."""
        now_s = time.time() if now_s is None else now_s
        cp = self._read_checkpoint()
        logged = self.client.xlen(keys.SERVED_FEATURES)
        if logged - int(cp.get("logged", 0)) >= self.settings.min_new_serves:
            return "volume"
        if self.settings.drift_trigger and self._drift_failed_since(float(cp.get("at", 0.0))):
            return "drift"
        if cp and now_s - float(cp.get("at", 0.0)) >= self.settings.interval_s:
            return "schedule"
        return None

    def _drift_failed_since(self, since_s: float) -> bool:
        from monitoring.drift import RUNS_DIR, SUMMARY_FILE

        runs = sorted((self.state.reports / RUNS_DIR).glob(f"*/{SUMMARY_FILE}"))
        if not runs:
            return False
        newest = runs[-1]
        if newest.stat().st_mtime <= since_s:
            return False
        try:
            summary = json.loads(newest.read_text())
        except ValueError:
            return False
        return summary.get("gate", {}).get("passed", summary.get("passed", True)) is False

    # ------------------------------------------------------------------ the cycle
    def _train_heavy(self, train: pd.DataFrame, valid: pd.DataFrame):
        from models.train import train_heavy

        return train_heavy(train, valid, self.state, set_champion=False)

    def training_window(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(train, eval): the newest ``window_serves`` labelled serves of the feature log, the
        newest ``eval_fraction`` of their requests held out.

        Raises:
            pipelines.logged_features.EmptyFeatureLogError: nothing logged or labelled.
        """
        from pipelines.logged_features import logged_training_set

        frame = logged_training_set(self.client, self.impressions(), window_s=self.settings.label_window_s)
        frame = frame.sort_values("request_id", kind="stable").tail(self.settings.window_serves)
        requests = frame["request_id"].unique()
        cut = requests[int(len(requests) * (1 - self.settings.eval_fraction))]
        train, valid = frame[frame["request_id"] < cut].copy(), frame[frame["request_id"] >= cut].copy()
        if train["date"].nunique() < 2:
            # a window inside one day (a busy hour, a simulation): the trainers hold out their last
            # `date` for early stopping, so the window's time order stands in for days: the
            # training part's newest fifth becomes the next day, the held-out part the one after
            day = int(train["date"].max())
            late = train["request_id"] >= train["request_id"].quantile(0.8)
            train["date"] = np.where(late, day + 1, day)
            valid["date"] = day + 2
        return train, valid

    def run_cycle(self, trigger: str = "forced") -> LoopDecision:
        """Train, gate, shadow, ramp, decide, restore and record (module docstring).

        Raises:
            pipelines.logged_features.EmptyFeatureLogError: nothing to train on.
            models.registry.RankerNotFoundError: no champion heavy ranker.
        """
        from models.promotion import compare_versions
        from models.registry import alias_version, promote

        s, uri = self.settings, self.state.mlflow_tracking_uri
        champion = alias_version(HEAVY_RANKER_NAME, tracking_uri=uri)
        train, valid = self.training_window()
        result = self.trainer(train, valid)
        version = int(result.model_version)
        promote(HEAVY_RANKER_NAME, version, CHALLENGER_ALIAS, tracking_uri=uri)
        metrics: dict[str, float] = {"train_rows": float(len(train)), "eval_rows": float(len(valid))}
        check = compare_versions(HEAVY_RANKER_NAME, champion, version, valid, uri)
        for c in check.heads:
            metrics[f"offline_gauc_{c.head}_champion"] = c.champion_gauc
            metrics[f"offline_gauc_{c.head}_challenger"] = c.challenger_gauc
        original = self.mixer_config.read_text()
        decision = None
        try:
            if s.offline_gate and not check.passed:
                decision = ("rejected_offline",
                            f"offline gate: worse on {check.describe(check.blocking_heads)}")
            else:
                decision = self._online(version, champion, metrics)
        finally:
            self.mixer_config.write_text(original)  # the mixers serve the experiment they had
        name, reason = decision
        if name == "promoted":
            promote(HEAVY_RANKER_NAME, version, tracking_uri=uri)
        out = LoopDecision(trigger, name, reason, champion, version, metrics)
        out.run_id = self._record(out)
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        self.checkpoint.write_text(json.dumps({"at": time.time(), "logged": self.client.xlen(keys.SERVED_FEATURES),
                                               "decision": name, "challenger_version": version}))
        log.info("loop: %s heavy_ranker v%s (champion v%s): %s", name, version, champion, reason)
        return out

    def _experiment(self, **changes) -> dict:
        data = yaml.safe_load(self.mixer_config.read_text()) or {}
        from mixer.config import load_config

        experiment = load_config(self.mixer_config).experiment.model_dump(mode="json", exclude_none=True)
        experiment.update(changes)
        data["experiment"] = experiment
        return data

    def _write(self, data: dict) -> None:
        self.mixer_config.write_text(yaml.safe_dump(data, sort_keys=False))
        time.sleep(self.settings.settle_s)

    def _online(self, version: int, champion: int, metrics: dict) -> tuple[str, str]:
        """The shadow and ramp phases; (decision, reason)."""
        from mixer.config import load_config
        from monitoring.experiment_report import label_served, read_served_impressions, readout

        s = self.settings
        base = load_config(self.mixer_config).experiment
        started = time.time()
        self._write(self._experiment(shadow={"heavy_ranker": CHALLENGER_ALIAS, "share": s.shadow_share}))
        self.drive("shadow")
        shadowed = [f for _, f in self.client.xrange(keys.SHADOW_LOG, min=f"{int(started * 1000)}-0")
                    if f.get(b"challenger_version") == str(version).encode()]
        metrics["shadow_requests"] = float(len(shadowed))
        if len(shadowed) < s.shadow_min_requests:
            return "rolled_back", (f"the challenger scored {len(shadowed)} shadow requests, fewer than "
                                   f"{s.shadow_min_requests}: it failed or saw no traffic")
        control = next(a for a in base.arms if a.interleave is None)
        arms = [a.model_dump(mode="json", exclude_none=True) | {"traffic_share": a.traffic_share * (1 - s.ramp_share)}
                for a in base.arms]
        arms.append({"name": CHALLENGER_ALIAS, "traffic_share": s.ramp_share, "weights": dict(control.weights),
                     "light_score_exponent": control.light_score_exponent,
                     "models": {"heavy_ranker": CHALLENGER_ALIAS}})
        exp_id = f"loop-v{version}"
        ramp_started = time.time()
        self._write(self._experiment(id=exp_id, salt=exp_id, arms=arms, shadow=None))
        engagements = self.drive("ramp")
        served = read_served_impressions(self.client, exp_id, since_s=ramp_started)
        if served.empty:
            return "rolled_back", f"the ramp served nothing in experiment {exp_id}"
        imp = engagements if engagements is not None else self.impressions()
        labelled = label_served(served, imp, s.label_window_s)
        shares = {a["name"]: a["traffic_share"] for a in arms}
        result = readout(labelled, shares, experiment=exp_id, control=control.name, max_p99_ratio=s.max_p99_ratio)
        arm = next((a for a in result.arms if a.arm == CHALLENGER_ALIAS), None)
        if arm is None:
            return "rolled_back", "no user of the ramp reached the challenger arm"
        lift = arm.lift[s.head]
        metrics |= {"ramp_users": float(arm.users), f"ramp_lift_{s.head}": lift.value,
                    f"ramp_lift_{s.head}_low": lift.low, f"ramp_lift_{s.head}_high": lift.high,
                    "ramp_srm_p": result.srm_p_value}
        if not result.passed:
            return "rolled_back", f"readout failed: SRM p {result.srm_p_value:.3g}, breaches {result.breaches}"
        if lift.high < 0:
            return "rolled_back", (f"{s.head} lift {lift.value:+.1%} [{lift.low:+.1%}, {lift.high:+.1%}] over "
                                   f"{arm.users} users: worse than control")
        return "promoted", (f"{s.head} lift {lift.value:+.1%} [{lift.low:+.1%}, {lift.high:+.1%}] over {arm.users} "
                            "users: not worse than control, and the offline gate passed")

    def _record(self, d: LoopDecision) -> str:
        """An MLflow run of ``home-mixer-loop`` per decision (explicit client: no process-wide URI)."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.state.mlflow_tracking_uri)
        exp = client.get_experiment_by_name(LOOP_EXPERIMENT)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(LOOP_EXPERIMENT)
        run = client.create_run(exp_id, tags={"decision": d.decision, "trigger": d.trigger,
                                              "reason": d.reason[:5000]})
        client.log_param(run.info.run_id, "champion_version", d.champion_version)
        client.log_param(run.info.run_id, "challenger_version", d.challenger_version)
        for k, v in d.metrics.items():
            if v == v:  # NaN is not loggable as a metric value everywhere
                client.log_metric(run.info.run_id, k, float(v))
        client.set_terminated(run.info.run_id)
        return run.info.run_id




def load_loop_settings(path: Path | None) -> LoopSettings:
    """``LoopSettings`` from a YAML file (None: the defaults).

    Raises:
        ValueError: the file is not a mapping or a key is unknown / out of range (pydantic's message).
    """
    if path is None:
        return LoopSettings()
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of loop settings")
    return LoopSettings.model_validate(data)


__all__ = ["LOOP_EXPERIMENT", "LoopDecision", "LoopSettings", "ModelUpdater", "load_loop_settings"]
