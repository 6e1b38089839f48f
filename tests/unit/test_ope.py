"""Off-policy estimators (models.ope) on simulated traffic whose true value is known exactly.

Each simulated decision has a pool of candidates with a true engagement probability; the logging
policy is a softmax over a noisy score, the target a softmax over a different one. The target's
true value is ``mean_x sum_a pi_e(a|x) mu(x, a)``, computed from the simulation, not estimated.
"""

from __future__ import annotations

import numpy as np
import pytest

from models.ope import doubly_robust, estimate_all, importance_weights, ips, snips, softmax_policy


def simulate(seed: int, n: int = 4000, m: int = 8, logging_t: float = 1.0, target_t: float = 0.6):
    rng = np.random.default_rng(seed)
    quality = rng.normal(0, 1, (n, m))
    mu = 1 / (1 + np.exp(-(quality - 1.5)))  # true engagement probability per candidate
    logging = softmax_policy(quality + rng.normal(0, 1.0, (n, m)), logging_t)
    target = softmax_policy(quality + rng.normal(0, 0.5, (n, m)), target_t)  # better: less noise, sharper
    logged = np.array([rng.choice(m, p=p) for p in logging])
    rows = np.arange(n)
    reward = (rng.random(n) < mu[rows, logged]).astype(float)
    truth = float((target * mu).sum(axis=1).mean())
    return dict(reward=reward, propensity=logging[rows, logged], logged=logged, target=target, mu=mu,
                truth=truth, logging=logging, rng=rng, logging_value=float((logging * mu).sum(axis=1).mean()))


def test_estimators_recover_the_true_value_and_their_intervals_cover_it():
    covered = {"ips": 0, "snips": 0, "dr": 0}
    errors = {"ips": [], "snips": [], "dr": []}
    better = 0
    seeds = 40
    for seed in range(seeds):
        s = simulate(seed)
        q = np.clip(s["mu"] + s["rng"].normal(0, 0.05, s["mu"].shape), 0, 1)  # a decent reward model
        est = estimate_all(s["reward"], s["propensity"], s["logged"], s["target"], q)
        for name, e in est.items():
            covered[name] += e.ci_low <= s["truth"] <= e.ci_high
            errors[name].append(e.value - s["truth"])
        better += est["dr"].ci_low > s["logging_value"]  # the target is better by ~0.06 per decision
    for name in covered:
        assert covered[name] >= 34, (name, covered[name])  # nominal 95 %: 38 of 40
        err = np.asarray(errors[name])
        assert abs(err.mean()) < 3 * err.std() / np.sqrt(seeds), (name, err.mean())  # no systematic bias
    # a good reward model cuts the error: DR beats IPS
    assert np.std(errors["dr"]) < 0.85 * np.std(errors["ips"])
    assert better >= 36  # the better policy is told apart from the one that logged


def test_the_logging_policy_evaluated_on_itself_is_the_mean_reward_with_unit_weights():
    s = simulate(1, n=500)
    rows = np.arange(500)
    est = estimate_all(s["reward"], s["propensity"], s["logged"], s["logging"])
    assert est["ips"].value == pytest.approx(s["reward"].mean())
    assert est["snips"].value == pytest.approx(s["reward"].mean())
    assert est["ips"].effective_n == pytest.approx(500) and est["ips"].max_weight == pytest.approx(1.0)
    assert (importance_weights(s["propensity"], s["logging"][rows, s["logged"]]) == 1).all()


def test_wrong_propensities_bias_ips_so_the_check_could_fail():
    """Logging uniform propensities for a softmax logger must miss the truth: the estimators
    trust the logged propensities, which is what the mixer's log has to get right."""
    misses = 0
    for seed in range(10):
        s = simulate(seed)
        pe = s["target"][np.arange(len(s["logged"])), s["logged"]]
        e = ips(s["reward"], np.full(len(pe), 1 / 8), pe)
        misses += not (e.ci_low <= s["truth"] <= e.ci_high)
    assert misses >= 8


def test_dr_with_a_wrong_reward_model_stays_unbiased():
    errs = []
    for seed in range(20):
        s = simulate(seed)
        wrong = np.full(s["mu"].shape, 0.5)  # a useless model: DR falls back on the weights
        errs.append(doubly_robust(s["reward"], s["propensity"], s["logged"], s["target"], wrong).value - s["truth"])
    assert abs(np.mean(errs)) < 3 * np.std(errs) / np.sqrt(len(errs))


def test_snips_interval_is_finite_and_ips_on_tiny_logs_is_honest():
    s = simulate(3, n=50)
    pe = s["target"][np.arange(50), s["logged"]]
    e = snips(s["reward"], s["propensity"], pe)
    assert np.isfinite(e.std_error) and e.ci_low < e.value < e.ci_high
    one = ips([1.0], [0.5], [0.5])
    assert one.value == 1.0 and one.std_error == float("inf")


@pytest.mark.parametrize("kwargs, message", [
    (dict(propensity=[0.0, 0.5], target_probability=[0.1, 0.2]), "outside \\(0, 1\\]"),
    (dict(propensity=[0.5, 1.2], target_probability=[0.1, 0.2]), "outside \\(0, 1\\]"),
    (dict(propensity=[0.5], target_probability=[0.1, 0.2]), "one per decision"),
    (dict(propensity=[0.5, np.nan], target_probability=[0.1, 0.2]), "non-finite"),
    (dict(propensity=[0.5, 0.5], target_probability=[0.1, 1.5]), "\\[0, 1\\]"),
    (dict(propensity=[], target_probability=[]), "no decisions"),
])
def test_bad_logs_are_refused_with_what_was_wrong(kwargs, message):
    with pytest.raises(ValueError, match=message):
        importance_weights(**kwargs)


def test_dr_refuses_inconsistent_pools():
    target = np.array([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]])
    q = np.zeros((2, 3))
    with pytest.raises(ValueError, match="distribution over its pool"):
        doubly_robust([1, 0], [0.5, 0.5], np.array([0, 1]), target * 2, q)
    with pytest.raises(ValueError, match="padded pool column"):
        doubly_robust([1, 0], [0.5, 0.5], np.array([0, 2]), target, q,
                      pool_mask=np.array([[1, 1, 0], [1, 1, 0]], bool))
    with pytest.raises(ValueError, match="integer pool indices"):
        doubly_robust([1, 0], [0.5, 0.5], np.array([0.0, 1.0]), target, q)
    with pytest.raises(ValueError, match="no support"):
        snips([1, 0], [0.5, 0.5], [0.0, 0.0])


def test_softmax_policy_masks_padding_and_approaches_greedy():
    p = softmax_policy([[1.0, 2.0, 9.0]], 0.01, mask=[[True, True, False]])
    assert p[0, 2] == 0 and p[0, 1] == pytest.approx(1.0)
    u = softmax_policy([[1.0, 2.0, 3.0]], 1e6)
    assert np.allclose(u, 1 / 3, atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        softmax_policy([[1.0]], 0)
