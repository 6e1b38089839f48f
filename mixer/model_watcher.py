"""Rollout without restarts: follow the registry aliases and swap newly promoted versions in.

``home-mixer models promote --model heavy --version N`` moves the alias; within one poll interval
every mixer loads version N in-process (it is also the fallback of a remote backend, which is asked
for version N from then on) and serves it from its next request. Promoting the old version back is
the rollback. A version that fails to load is logged and counted, and the running one stays.
"""

from __future__ import annotations

import logging
from typing import Callable

from mixer.polling import PeriodicCheck

log = logging.getLogger(__name__)


class ModelAliasWatcher(PeriodicCheck):
    """Polls ``resolve_versions`` every ``interval_s`` seconds; on a change, ``load`` + swap.

    Args:
        pipeline: a ``HomeTimelinePipeline`` (``model_versions``, ``swap_rankers``).
        resolve_versions: () -> {"light_ranker": version, "heavy_ranker": version[, "two_tower":
            version]} from the registry.
        load: () -> (light handle, heavy handle[, retrieval handle]) at the aliases' current
            versions: the arguments of ``pipeline.swap_rankers``.
        interval_s: seconds between polls.
        metrics: ``MixerMetrics`` (``model_reloads_total{model,outcome}``).
    """

    thread_name = "hm-model-watcher"

    def __init__(self, pipeline, resolve_versions: Callable[[], dict[str, int]],
                 load: Callable[[], tuple], interval_s: float, metrics,
                 after_swap: Callable[[], None] | None = None):
        self.after_swap = after_swap
        self.pipeline = pipeline
        self.resolve_versions = resolve_versions
        self.load = load
        self.interval_s = interval_s
        self.metrics = metrics
        self._failed: dict[str, str] | None = None  # versions that could not be served

    def check_once(self) -> bool:
        """Swap if an alias moved; True when new versions are now served."""
        try:
            wanted = {k: str(v) for k, v in self.resolve_versions().items()}
        except Exception as e:  # noqa: BLE001 - registry hiccups must not stop serving
            log.warning("model alias check failed: %r", e)
            return False
        current = self.pipeline.model_versions
        changed = [m for m, v in wanted.items() if current.get(m) != v]
        if not changed or wanted == self._failed:  # a failed version is retried only after a new promote
            return False
        try:
            self.pipeline.swap_rankers(*self.load())
        except Exception as e:  # noqa: BLE001
            self._failed = wanted
            log.error("could not load promoted versions %s: %r; still serving %s", wanted, e, current)
            for m in changed:
                self.metrics.model_reloads.labels(model=m, outcome="failed").inc()
            return False
        for m in changed:
            self.metrics.model_reloads.labels(model=m, outcome="swapped").inc()
        log.info("now serving %s (was %s)", self.pipeline.model_versions, current)
        self.swapped()
        return True
