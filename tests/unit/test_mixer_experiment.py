"""Experiment arms: a stable hash of (salt, user) split by traffic share."""

from __future__ import annotations

import collections

from mixer.candidate import Query
from mixer.config import ArmSettings, ExperimentSettings
from mixer.query_hydrators import ExperimentArmQueryHydrator, assign_arm


def _experiment(shares=(0.5, 0.5), salt="s1"):
    return ExperimentSettings(salt=salt, arms=tuple(
        ArmSettings(name=f"arm{i}", traffic_share=s, weights={"click": 1.0}) for i, s in enumerate(shares)))


def test_same_user_same_arm_across_hydrator_instances():
    exp = _experiment()
    first = {u: assign_arm(exp, u) for u in range(500)}
    again = ExperimentArmQueryHydrator(_experiment())
    for u, arm in first.items():
        q = again.hydrate(Query(user_id=u, page_size=1, now_s=0.0, request_id="r"))
        assert q.arm == arm


def test_split_follows_traffic_shares():
    exp = _experiment((0.2, 0.8))
    n = 20_000
    counts = collections.Counter(assign_arm(exp, u) for u in range(n))
    # binomial sd at p=0.2, n=20k is 0.0028; 0.015 is > 5 sd
    assert abs(counts["arm0"] / n - 0.2) < 0.015
    assert abs(counts["arm1"] / n - 0.8) < 0.015


def test_zero_share_arm_gets_nobody_and_salt_reshuffles():
    exp = _experiment((0.0, 1.0))
    assert {assign_arm(exp, u) for u in range(2000)} == {"arm1"}
    a, b = _experiment(salt="a"), _experiment(salt="b")
    moved = sum(assign_arm(a, u) != assign_arm(b, u) for u in range(2000))
    assert 800 < moved < 1200  # independent hashes: about half the users change arm
