"""Experiment arm assignment by a stable hash of the user id.

``u = int(sha256(f"{salt}:{user_id}")[:8], big-endian) / 2**64`` is uniform in [0, 1) and the same
for the same (salt, user) on every host and process (Python's ``hash()`` is salted per process, so
it is not used). Arms own consecutive intervals of [0, 1) of length ``traffic_share`` in config
order; the user gets the arm whose interval holds ``u``. Changing the salt reshuffles everyone;
changing shares moves only users near the boundaries. A holdout (``experiment.holdout``) takes
the users whose position under its own salt is below its share, before the arms.
"""

from __future__ import annotations

import dataclasses
import hashlib

from mixer.candidate import Query
from mixer.components import QueryHydrator
from mixer.config import HOLDOUT_ARM, ExperimentSettings


def arm_unit_interval(salt: str, user_id: int) -> float:
    """The user's stable position in [0, 1) for this salt (sha256, first 8 bytes)."""
    digest = hashlib.sha256(f"{salt}:{int(user_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(experiment: ExperimentSettings, user_id: int) -> str:
    """Name of the arm of ``user_id`` (deterministic; shares from ``experiment.arms``), or
    ``holdout`` for a user the holdout keeps (its own salt, checked first: the same users stay
    held out whatever the experiment's salt and arms)."""
    if experiment.holdout is not None and arm_unit_interval(experiment.holdout.salt, user_id) < experiment.holdout.share:
        return HOLDOUT_ARM
    u = arm_unit_interval(experiment.salt, user_id)
    cumulative = 0.0
    for arm in experiment.arms:
        cumulative += arm.traffic_share
        if u < cumulative:
            return arm.name
    # shares sum to 1 within 1e-6: rounding can leave u just above the last boundary
    return [a for a in experiment.arms if a.traffic_share > 0][-1].name


class ExperimentArmQueryHydrator(QueryHydrator):
    """Sets ``Query.arm`` from the experiment settings, and the arm's candidate-source overrides
    (``source_limits``, ``disabled_sources``; ``experiment.arms[].sources``). No I/O."""

    name = "experiment_arm"

    def __init__(self, experiment: ExperimentSettings):
        self.experiment = experiment
        self._sources = {a.name: ({n: o.max_candidates for n, o in a.sources.items() if o.max_candidates is not None},
                                  frozenset(n for n, o in a.sources.items() if not o.enabled))
                         for a in experiment.served_arms}

    def hydrate(self, query: Query) -> Query:
        """Return ``query`` with ``arm`` and the arm's source overrides set."""
        arm = assign_arm(self.experiment, query.user_id)
        limits, off = self._sources[arm]
        return dataclasses.replace(query, arm=arm, source_limits=limits, disabled_sources=off)
