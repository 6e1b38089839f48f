"""Experiments without restarts: follow the config file and serve a changed ``experiment`` section.

Every ``config_reload_interval_s`` the watcher compares the file's bytes with what it last read.
On a change it validates the whole file (``mixer.config.load_config``): an invalid file is logged
and counted (``hm_mixer_config_reloads_total{outcome="invalid"}``) and the running experiment
stays. A valid one has its ``experiment`` section applied (arms, shares, weights, per-arm models
and sources, holdout, shadow): the models it newly names are loaded, the pipeline is declared
again and swapped in at the next request (``HomeTimelinePipeline.reconfigure``). Changes outside
``experiment`` (Redis, sources' defaults, caches...) need a restart; they are logged as such and
not applied, so one process never serves half of a config.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Callable

from mixer.config import ConfigError, MixerConfig, load_config
from mixer.polling import PeriodicCheck

log = logging.getLogger(__name__)


class ExperimentConfigWatcher(PeriodicCheck):
    """Polls ``path`` and applies a changed experiment (module docstring).

    Args:
        path: the YAML file the mixer was started with (merged over the embedded default).
        pipeline: a ``HomeTimelinePipeline`` (``config``, ``reconfigure``).
        load_models: config -> (arm -> light ranker, arm -> heavy ranker, shadow heavy ranker or
            None): the models the experiment names (``mixer.api._load_experiment_rankers``).
        declare_for: config -> the pipeline declaration bound to it (``mixer.pipeline.declaration``).
        interval_s: seconds between polls.
        on_outcome: called with "applied", "invalid", "failed" (models could not load or do not fit)
            or "restart_needed" (a change outside ``experiment``) per change seen.
        after_swap: called after an experiment was applied (``PeriodicCheck.after_swap``).
    """

    thread_name = "hm-config-watcher"

    def __init__(self, path: str | Path, pipeline, load_models: Callable[[MixerConfig], tuple],
                 declare_for: Callable[[MixerConfig], Callable], interval_s: float,
                 on_outcome: Callable[[str], None] = lambda outcome: None,
                 after_swap: Callable[[], None] | None = None):
        self.after_swap = after_swap
        self.path = Path(path)
        self.pipeline = pipeline
        self.load_models = load_models
        self.declare_for = declare_for
        self.interval_s = float(interval_s)
        self.on_outcome = on_outcome
        self._digest = self._read_digest()
        self._file_config = load_config(self.path)  # the file as it was at start-up, without CLI overrides

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def check_once(self) -> str | None:
        """Apply the file if it changed; returns the outcome (None: unchanged)."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return None
        self._digest = digest
        try:
            new = load_config(self.path)
        except ConfigError as e:
            log.error("%s changed but is invalid; still serving experiment %r: %s", self.path,
                      self.pipeline.config.experiment.id, e)
            return self._outcome("invalid")
        outside = [name for name in type(new).model_fields
                   if name != "experiment" and getattr(new, name) != getattr(self._file_config, name)]
        if outside:
            log.warning("%s changed %s: those need a restart; only `experiment` is applied live", self.path,
                        outside)
        current = self.pipeline.config
        if new.experiment == current.experiment:
            return self._outcome("restart_needed") if outside else None
        config = current.with_overrides(experiment=new.experiment.model_dump(mode="json"))
        try:
            light_by_arm, heavy_by_arm, shadow = self.load_models(config)
            self.pipeline.reconfigure(config, self.declare_for(config), light_by_arm, heavy_by_arm, shadow)
        except Exception as e:  # noqa: BLE001 - a bad experiment must not stop serving the running one
            log.error("could not apply experiment %r from %s (%r); still serving %r", new.experiment.id, self.path,
                      e, current.experiment.id)
            return self._outcome("failed")
        log.info("now serving experiment %r (arms %s)", config.experiment.id,
                 [a.name for a in config.experiment.served_arms])
        self.swapped()
        return self._outcome("applied")

    def _outcome(self, outcome: str) -> str:
        self.on_outcome(outcome)
        return outcome
