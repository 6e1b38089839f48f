"""Off-policy evaluation from exploration-log entries (monitoring/ope_report.py): decisions per slot,
target policies re-scored from logged heads, and estimates that find a known truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from core.schema import HEADS
from models.ope import softmax_policy
from monitoring.ope_report import (OffPolicyDataError, TargetPolicy, decision_rewards, decisions_from_entries,
                                   evaluate, read_exploration_log)

EXAM = 1 / (1 + np.arange(5)) ** 0.5  # a position-based examination, as the simulator's


def _traffic(requests: int, pool: int = 12, slots: int = 4, temperature: float = 0.05, seed: int = 0):
    """Exploring pages served by a softmax over the click head (Plackett-Luce slot by slot), with
    rewards drawn from exam(k) * p_click, and the log entries the mixer would write."""
    rng = np.random.default_rng(seed)
    entries, rows, truth_p = [], [], []
    for r in range(requests):
        p = rng.beta(2, 8, size=pool)
        like = rng.beta(1, 20, size=pool)
        heads = [{h: (float(p[i]) if h == "click" else float(like[i]) if h == "like" else 0.0) for h in HEADS}
                 for i in range(pool)]
        left = np.ones(pool, dtype=bool)
        drawn = []
        for k in range(slots):
            probs = softmax_policy(p, temperature, left)
            a = int(rng.choice(pool, p=probs))
            drawn.append([a, float(probs[a])])
            clicked = int(rng.random() < EXAM[k] * p[a])
            rows.append({"request_id": f"req{r}", "post_id": 1000 * r + a, "click": clicked})
            truth_p.append((p.copy(), left.copy(), k))
            left[a] = False
        entries.append({"request_id": f"req{r}", "user_id": str(r % 50), "arm": "explore", "served_at": "1.0",
                        "pool": json.dumps([[1000 * r + i, float(p[i]), 0.5, heads[i]] for i in range(pool)]),
                        "slots": json.dumps(drawn)})
    return entries, pd.DataFrame(rows), truth_p


def test_each_slot_is_a_decision_over_the_posts_not_drawn_above_it():
    entries, _, _ = _traffic(3, pool=5, slots=3)
    log = decisions_from_entries(entries)
    assert len(log) == 9 and log.post_ids.shape == (9, 5) and log.heads.shape == (9, 5, len(HEADS))
    first = json.loads(entries[0]["slots"])
    assert log.action[:3].tolist() == [s[0] for s in first]
    assert log.mask[0].all() and log.mask[1].sum() == 4 and log.mask[2].sum() == 3
    assert not log.mask[1, first[0][0]] and not log.mask[2, first[1][0]]  # drawn above: no longer an action
    assert log.position[:3].tolist() == [0, 1, 2] and log.logged_post[0] == first[0][0]
    greedy = TargetPolicy({"click": 1.0}).probabilities(log)
    scores = np.where(log.mask, log.heads[:, :, HEADS.index("click")], -np.inf)
    assert (greedy.argmax(axis=1) == scores.argmax(axis=1)).all() and (greedy.sum(axis=1) == 1).all()
    soft = TargetPolicy({"click": 1.0}, temperature=0.1).probabilities(log)
    assert np.allclose(soft.sum(axis=1), 1) and (soft[~log.mask] == 0).all()


def test_estimates_find_the_true_value_of_a_policy_that_was_not_served():
    entries, clicks, truth_p = _traffic(3000)
    log = decisions_from_entries(entries)
    reward = decision_rewards(log, clicks, "click")
    assert reward.sum() == clicks["click"].sum()
    for target in (TargetPolicy({"click": 1.0}), TargetPolicy({"click": 1.0, "like": 2.0}),
                   TargetPolicy({"click": 1.0}, temperature=0.2)):
        pe = target.probabilities(log)
        p = np.array([tp[0] for tp in truth_p])
        exam = np.array([EXAM[tp[2]] for tp in truth_p])
        truth = float(((pe * p).sum(axis=1) * exam).mean())
        est = evaluate(log, reward, target)
        for name in ("ips", "snips", "dr"):  # within 3 standard errors (9 checks: not 95 % each)
            e = est[name]
            assert abs(e.value - truth) <= 3 * e.std_error, (target, name, e, truth)
        assert est["logged"].value == pytest.approx(reward.mean())
    greedy_click = evaluate(log, reward, TargetPolicy({"click": 1.0}))["dr"]
    by_like = evaluate(log, reward, TargetPolicy({"like": 1.0}))["dr"]
    assert greedy_click.value > by_like.value  # the click-greedy policy earns more clicks than ranking by likes
    # a target far from the logging policy has little support: its weights say so
    assert by_like.effective_n < 0.01 * by_like.n < greedy_click.effective_n


def test_no_log_and_bad_targets_are_clear_errors(redis_client):
    with pytest.raises(OffPolicyDataError, match="serve an arm with `exploration:`"):
        read_exploration_log(redis_client)
    with pytest.raises(ValueError, match="weighs heads of"):
        TargetPolicy({"clicks": 1.0})
    with pytest.raises(ValueError, match="temperature must be > 0"):
        TargetPolicy({"click": 1.0}, temperature=0)
    entries, clicks, _ = _traffic(2)
    with pytest.raises(OffPolicyDataError, match="no 'hate' column"):
        decision_rewards(decisions_from_entries(entries), clicks, "hate")
