"""Off-policy evaluation: the value of a ranking policy that was not served, from the logs of one
that was, served with known propensities.

The unit is a **decision**: one slot of one request, where the logging policy picked one post out
of a pool of candidates with probability ``propensity`` (the mixer's exploration selector logs it:
``mixer.selectors.exploration``), and the reward is the engagement that followed (0/1, or a
weighted sum of heads). A target policy gives, for the same decision, a probability per pool
candidate. Every estimator here is unbiased (IPS, DR) or consistent (SNIPS) for the target's mean
reward per decision when the logging propensities are right and positive wherever the target
puts mass (common support); they are the estimators of Open Bandit Pipeline (Saito et al. 2021),
which needs Python < 3.11, so they are written out here with their sources:

- **IPS** (inverse propensity scoring; Horvitz & Thompson 1952, for bandits Li et al. 2011,
  "Unbiased offline evaluation of contextual-bandit-based news article recommendation
  algorithms"): ``V = mean_i( w_i * r_i )``, ``w_i = pi_e(a_i|x_i) / pi_0(a_i|x_i)``.
- **SNIPS** (self-normalised IPS; Swaminathan & Joachims 2015, "The self-normalized estimator
  for counterfactual learning"): ``V = sum_i(w_i r_i) / sum_i(w_i)``; biased by O(1/n), much
  lower variance when weights are large.
- **DR** (doubly robust; Dudík, Langford & Li 2011, "Doubly robust policy evaluation and
  learning", eq. 2): ``V = mean_i( sum_a pi_e(a|x_i) q(x_i,a) + w_i (r_i - q(x_i,a_i)) )`` with a
  reward model ``q``; unbiased if either the propensities or ``q`` are right, and lower variance
  than IPS when ``q`` is good.

Intervals are normal (95 %, z = 1.96) from the per-decision terms' standard error; for SNIPS
the delta method (terms ``w_i (r_i - V) / mean(w)``). Decisions of one request are not
independent; with many requests and short pages the effect on the interval is small, and a
bootstrap over requests is the conservative check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5 % quantile


@dataclass(frozen=True)
class OffPolicyEstimate:
    """One estimator's result.

    Attributes:
        estimator: ``ips``, ``snips`` or ``dr``.
        value: the target policy's estimated mean reward per decision.
        std_error: its standard error (same unit).
        ci_low, ci_high: the 95 % normal interval.
        n: decisions used.
        effective_n: Kish's effective sample size of the weights, ``(sum w)^2 / sum w^2``: how many
            decisions the estimate is worth (n when target = logging policy).
        max_weight: the largest importance weight (a few huge weights mean an unreliable estimate).
    """

    estimator: str
    value: float
    std_error: float
    ci_low: float
    ci_high: float
    n: int
    effective_n: float
    max_weight: float

    def to_dict(self) -> dict[str, float | int | str]:
        """The fields as a JSON-ready dict."""
        return dict(self.__dict__)


def _vector(name: str, values, n: int | None = None) -> np.ndarray:
    out = np.asarray(values, dtype="float64")
    if out.ndim != 1:
        raise ValueError(f"{name} must be one value per decision (1-D), got shape {out.shape}")
    if n is not None and len(out) != n:
        raise ValueError(f"{name} has {len(out)} values for {n} decisions; pass one per decision")
    if not np.isfinite(out).all():
        raise ValueError(f"{name} has {int((~np.isfinite(out)).sum())} non-finite values (NaN or inf); "
                         "drop those decisions or fix the log")
    return out


def importance_weights(propensity, target_probability) -> np.ndarray:
    """``w_i = pi_e(a_i|x_i) / pi_0(a_i|x_i)`` per decision (float64, shape (n,)).

    Args:
        propensity: (n,) the logging policy's probability of the logged action, in (0, 1].
        target_probability: (n,) the target policy's probability of the same action, in [0, 1].

    Raises:
        ValueError: shapes differ, a value is not finite, a propensity is not in (0, 1] (a zero
            propensity means the action could not have been logged: the log is wrong), or a
            target probability is outside [0, 1].
    """
    p0 = _vector("propensity", propensity)
    pe = _vector("target_probability", target_probability, len(p0))
    if len(p0) == 0:
        raise ValueError("no decisions to evaluate")
    if ((p0 <= 0) | (p0 > 1)).any():
        bad = p0[(p0 <= 0) | (p0 > 1)]
        raise ValueError(f"{len(bad)} propensities outside (0, 1] (e.g. {bad[:3].tolist()}): an action logged "
                         "with probability 0 means the log's propensities are wrong")
    if ((pe < 0) | (pe > 1)).any():
        raise ValueError("target probabilities must be in [0, 1]")
    return pe / p0


def _estimate(name: str, value: float, terms: np.ndarray, w: np.ndarray) -> OffPolicyEstimate:
    n = len(terms)
    se = float(terms.std(ddof=1) / np.sqrt(n)) if n > 1 else float("inf")
    ess = float(w.sum() ** 2 / (w ** 2).sum()) if (w ** 2).sum() > 0 else 0.0
    return OffPolicyEstimate(name, float(value), se, float(value - Z95 * se), float(value + Z95 * se), n, ess,
                             float(w.max()))


def ips(reward, propensity, target_probability) -> OffPolicyEstimate:
    """Inverse propensity scoring (module docstring): ``mean(w * r)``.

    Args:
        reward: (n,) reward of each logged decision (e.g. 0/1 engagement).
        propensity, target_probability: as in :func:`importance_weights`.

    Raises:
        ValueError: as :func:`importance_weights`, or ``reward`` has another length.
    """
    w = importance_weights(propensity, target_probability)
    r = _vector("reward", reward, len(w))
    terms = w * r
    return _estimate("ips", terms.mean(), terms, w)


def snips(reward, propensity, target_probability) -> OffPolicyEstimate:
    """Self-normalised IPS (module docstring): ``sum(w r) / sum(w)``, delta-method interval.

    Raises:
        ValueError: as :func:`ips`, or every weight is 0 (the target never takes a logged action:
            no support, nothing to estimate from).
    """
    w = importance_weights(propensity, target_probability)
    r = _vector("reward", reward, len(w))
    if w.sum() <= 0:
        raise ValueError("the target policy gives probability 0 to every logged action: the logs have no "
                         "support for it; log with more exploration")
    value = float((w * r).sum() / w.sum())
    terms = w * (r - value) / w.mean()  # the delta method's linearisation (mean 0)
    return _estimate("snips", value, terms, w)


def doubly_robust(reward, propensity, logged_action, target_probabilities, reward_model,
                  pool_mask=None) -> OffPolicyEstimate:
    """Doubly robust (Dudík, Langford & Li 2011, eq. 2): the reward model's value of the target
    plus the importance-weighted residual of the logged action.

    Args:
        reward: (n,) rewards.
        propensity: (n,) logging probability of the logged action.
        logged_action: (n,) int index of the logged action in its decision's pool (columns below).
        target_probabilities: (n, m) the target's probability of each pool candidate (rows sum to 1
            over the pool; padded columns 0).
        reward_model: (n, m) the predicted reward ``q(x, a)`` of each pool candidate.
        pool_mask: optional (n, m) bool, True where a pool column holds a real candidate (the
            target's probabilities must be 0 elsewhere).

    Raises:
        ValueError: shapes disagree, probabilities do not sum to 1 per row (tolerance 1e-6), the
            logged action is outside its pool, or as :func:`importance_weights`.
    """
    pe_all = np.asarray(target_probabilities, dtype="float64")
    q_all = np.asarray(reward_model, dtype="float64")
    if pe_all.ndim != 2 or q_all.shape != pe_all.shape:
        raise ValueError(f"target_probabilities and reward_model must both be (decisions, pool) matrices, "
                         f"got {pe_all.shape} and {q_all.shape}")
    n, m = pe_all.shape
    a = np.asarray(logged_action)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"logged_action must be ({n},) integer pool indices, got {a.shape} {a.dtype}")
    if ((a < 0) | (a >= m)).any():
        raise ValueError(f"logged_action indices must be in [0, {m}); the pool is the decision's candidates")
    mask = np.ones((n, m), dtype=bool) if pool_mask is None else np.asarray(pool_mask, dtype=bool)
    if mask.shape != (n, m):
        raise ValueError(f"pool_mask must be ({n}, {m}), got {mask.shape}")
    if not mask[np.arange(n), a].all():
        raise ValueError("a logged action lies in a padded pool column (pool_mask False)")
    if (pe_all[~mask] != 0).any() or not np.allclose(pe_all.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("each row of target_probabilities must be a distribution over its pool (sum 1, "
                         "0 on padding)")
    if not np.isfinite(q_all[mask]).all():
        raise ValueError("reward_model has non-finite values inside the pool")
    rows = np.arange(n)
    w = importance_weights(propensity, pe_all[rows, a])
    r = _vector("reward", reward, n)
    q = np.where(mask, q_all, 0.0)
    direct = (pe_all * q).sum(axis=1)
    terms = direct + w * (r - q[rows, a])
    return _estimate("dr", terms.mean(), terms, w)


def softmax_policy(scores, temperature: float, mask=None) -> np.ndarray:
    """A softmax over each row's scores: ``p_a = exp(s_a / T) / sum_b exp(s_b / T)`` (float64, the
    shape of ``scores``; 0 where ``mask`` is False). The exploration policy of the mixer and a
    usual target policy.

    Args:
        scores: (..., m) scores (e.g. blended scores of a decision's pool).
        temperature: T > 0; small T approaches the greedy argmax, large T uniform.
        mask: optional bool array of the same shape, True where a column is a real candidate.

    Raises:
        ValueError: ``temperature <= 0`` or a row has no candidate.
    """
    if not temperature > 0:
        raise ValueError(f"softmax temperature must be > 0, got {temperature}")
    s = np.asarray(scores, dtype="float64") / temperature
    mask = np.ones(s.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if not mask.any(axis=-1).all():
        raise ValueError("a decision's pool is empty")
    s = np.where(mask, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)  # stable: the largest exponent is 0
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def estimate_all(reward, propensity, logged_action, target_probabilities, reward_model=None,
                 pool_mask=None) -> dict[str, OffPolicyEstimate]:
    """IPS, SNIPS and (with ``reward_model``) DR of one target policy on one log (arguments as in
    :func:`doubly_robust`); keyed by estimator name."""
    pe_all = np.asarray(target_probabilities, dtype="float64")
    a = np.asarray(logged_action)
    pe = pe_all[np.arange(len(a)), a]
    out = {"ips": ips(reward, propensity, pe), "snips": snips(reward, propensity, pe)}
    if reward_model is not None:
        out["dr"] = doubly_robust(reward, propensity, a, pe_all, reward_model, pool_mask)
    return out
