"""Off-policy evaluation from the mixer's exploration log: what a ranking policy that was not
served would have earned, from the pages an exploring arm served with known propensities.

``hm:exploration`` (``mixer.side_effects.exploration_log``) holds, per exploring request, its pool
(post ids, blended and light scores, heavy-ranker heads) and its drawn slots (pool index and
propensity, in page order). Each slot is one **decision** (``models.ope``): the context is the
request and the slot, the actions are the pool candidates not drawn at an earlier slot of the
page, the logged action is the post drawn, and its propensity is the logging policy's probability
of it given the slots above (Plackett-Luce for ``softmax``: ``mixer.selectors.exploration``).

A **target policy** re-scores each decision's candidates from the logged heads and light score
with its own blend weights (``WeightedSumBlender``'s formula) and picks slot by slot: a softmax at
its ``temperature``, or greedily (the best remaining; ``temperature`` None). Its value per
decision is estimated by IPS, SNIPS and doubly robust (``models.ope``). DR's reward model is a
direct method fit on the log itself and cross-fitted over two halves of the requests (each half's
rewards predicted by the other half's fit, so its errors do not correlate with the residuals it
corrects; Chernozhukov et al. 2018): ``q(x, a) = c_k * p_head(a)``, the logged heavy-ranker
probability of the head scaled per slot ``k`` by the ratio of observed to predicted reward there
(the position's examination).

The estimand is the per-slot value with the logged pages above each slot (the slot-independence a
position-based click model assumes): what the target policy would have earned at each logged
decision. ``home-mixer experiment ope`` prints it for a target; ``--simulate`` checks it against
the true value, which simulated users know exactly (``home_mixer.simulator``: ``sum_a pi_e(a|x)
exam(k) p(user, a)``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core import online_layout as keys
from core.schema import HEADS
from mixer.blenders.weighted_sum import LIGHT_SCORE_FLOOR
from models.ope import OffPolicyEstimate, estimate_all, ips, softmax_policy


class OffPolicyDataError(ValueError):
    """The exploration log cannot answer the question (no entries, no rewards, a head not logged)."""


@dataclass(frozen=True)
class DecisionLog:
    """Every slot of the logged exploring pages, as padded matrices (``n`` decisions, pools of at
    most ``m`` candidates).

    Attributes:
        request_id, user_id, arm: per decision (object / int64 / object ``(n,)``).
        position: the slot's place on its page, 0-based (int64 ``(n,)``).
        post_ids: ``(n, m)`` int64, -1 on padding and on candidates drawn at an earlier slot.
        mask: ``(n, m)`` bool, True where ``post_ids`` is an action of the decision.
        heads: ``(n, m, len(HEADS))`` float64 logged heavy-ranker probabilities (``core.schema.HEADS``
            order; NaN where not logged).
        light: ``(n, m)`` float64 logged light scores.
        action: ``(n,)`` int64 column of the drawn post.
        propensity: ``(n,)`` float64 logging probability of the drawn post.
    """

    request_id: np.ndarray
    user_id: np.ndarray
    arm: np.ndarray
    position: np.ndarray
    post_ids: np.ndarray
    mask: np.ndarray
    heads: np.ndarray
    light: np.ndarray
    action: np.ndarray
    propensity: np.ndarray

    def __len__(self) -> int:
        return len(self.action)

    @property
    def logged_post(self) -> np.ndarray:
        """``(n,)`` the post drawn at each decision."""
        return self.post_ids[np.arange(len(self)), self.action]


def read_exploration_log(client, *, arm: str | None = None, since_s: float | None = None,
                         stream: str = keys.EXPLORATION_LOG, batch: int = 5_000) -> DecisionLog:
    """The decisions of the exploration log (optionally one arm's, served from ``since_s`` on).

    Raises:
        OffPolicyDataError: no entry matches.
    """
    entries = []
    start = "-"
    while True:
        chunk = client.xrange(stream, min=start, max="+", count=batch)
        for _, f in chunk:
            f = {k.decode(): v.decode() for k, v in f.items()}
            if (arm is None or f["arm"] == arm) and (since_s is None or float(f["served_at"]) >= since_s):
                entries.append(f)
        if len(chunk) < batch:
            break
        start = "(" + chunk[-1][0].decode()
    if not entries:
        raise OffPolicyDataError(f"no exploration log entries{f' of arm {arm!r}' if arm else ''} in {stream}: serve "
                                 "an arm with `exploration:` first (README, Exploration with logged propensities)")
    return decisions_from_entries(entries)


def decisions_from_entries(entries: list[dict]) -> DecisionLog:
    """:class:`DecisionLog` of exploration-log entries (``pool`` and ``slots`` as logged JSON)."""
    pools = [json.loads(e["pool"]) for e in entries]
    slots = [json.loads(e["slots"]) for e in entries]
    n = sum(len(s) for s in slots)
    m = max(len(p) for p in pools)
    post_ids = np.full((n, m), -1, dtype=np.int64)
    heads = np.full((n, m, len(HEADS)), np.nan)
    light = np.full((n, m), np.nan)
    request_id, user_id, arm, position = [], [], [], []
    action = np.empty(n, dtype=np.int64)
    propensity = np.empty(n, dtype=np.float64)
    i = 0
    for e, pool, drawn in zip(entries, pools, slots):
        ids = np.array([p[0] for p in pool], dtype=np.int64)
        hm = np.array([[np.nan if p[3].get(h) is None else p[3][h] for h in HEADS] for p in pool], dtype=np.float64)
        ls = np.array([np.nan if p[2] is None else p[2] for p in pool], dtype=np.float64)
        left = np.ones(len(pool), dtype=bool)
        for k, (pool_index, prop) in enumerate(drawn):
            post_ids[i, :len(pool)] = np.where(left, ids, -1)
            heads[i, :len(pool)] = hm
            light[i, :len(pool)] = ls
            action[i], propensity[i] = int(pool_index), float(prop)
            request_id.append(e["request_id"])
            user_id.append(int(e["user_id"]))
            arm.append(e["arm"])
            position.append(k)
            left[int(pool_index)] = False
            i += 1
    return DecisionLog(np.array(request_id, dtype=object), np.array(user_id, dtype=np.int64),
                       np.array(arm, dtype=object), np.array(position, dtype=np.int64), post_ids, post_ids >= 0,
                       heads, light, action, propensity)


@dataclass(frozen=True)
class TargetPolicy:
    """A ranking policy to evaluate: blend weights per head, the light score's exponent (as an
    experiment arm: ``mixer.config.ArmSettings``) and a softmax ``temperature`` (None: greedy)."""

    weights: dict[str, float]
    light_score_exponent: float = 0.0
    temperature: float | None = None

    def __post_init__(self):
        unknown = sorted(set(self.weights) - set(HEADS))
        if unknown or not self.weights:
            raise ValueError(f"a target policy weighs heads of {list(HEADS)}; got {sorted(self.weights)}")
        if self.temperature is not None and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (or None for greedy), got {self.temperature}")

    def scores(self, log: DecisionLog) -> np.ndarray:
        """``(n, m)`` blended scores of every candidate (``WeightedSumBlender``'s formula)."""
        s = np.zeros(log.mask.shape)
        for h, w in self.weights.items():
            s += w * np.nan_to_num(log.heads[:, :, HEADS.index(h)])
        e = self.light_score_exponent
        if e:
            factor = np.maximum(np.nan_to_num(log.light, nan=1.0), LIGHT_SCORE_FLOOR) ** e
            s = np.where(s >= 0, s * factor, s / factor)
        return s

    def probabilities(self, log: DecisionLog) -> np.ndarray:
        """``(n, m)`` the policy's probability of each candidate at each decision (0 off the mask)."""
        s = self.scores(log)
        if self.temperature is not None:
            return softmax_policy(s, self.temperature, log.mask)
        best = np.argmax(np.where(log.mask, s, -np.inf), axis=1)
        out = np.zeros(log.mask.shape)
        out[np.arange(len(log)), best] = 1.0
        return out


def decision_rewards(log: DecisionLog, engagements: pd.DataFrame, head: str) -> np.ndarray:
    """``(n,)`` 0/1 reward of each decision: whether the user engaged on ``head`` with the drawn
    post of that request (``engagements``: ``request_id``, ``post_id`` and a 0/1 ``head`` column,
    e.g. the labelled impression log or simulated pages; a missing row is 0)."""
    if head not in engagements.columns:
        raise OffPolicyDataError(f"no {head!r} column in the engagements")
    got = engagements.groupby(["request_id", "post_id"])[head].max()
    index = pd.MultiIndex.from_arrays([log.request_id, log.logged_post])
    return got.reindex(index).fillna(0).to_numpy(dtype=np.float64)


def cross_fitted_reward_model(log: DecisionLog, reward: np.ndarray, head: str) -> np.ndarray:
    """``(n, m)`` DR's reward model (module docstring): ``c_k * p_head(a)``, ``c_k`` fit per slot on
    the other half of the requests (halves by a hash of the request id)."""
    p = np.nan_to_num(log.heads[:, :, HEADS.index(head)])
    p_logged = p[np.arange(len(log)), log.action]
    half = np.array([hash_half(r) for r in log.request_id], dtype=bool)
    q = np.zeros(p.shape)
    positions = np.unique(log.position)
    for fit_on, apply_to in ((half, ~half), (~half, half)):
        for k in positions:
            at = log.position == k
            denom = p_logged[fit_on & at].sum()
            c = reward[fit_on & at].sum() / denom if denom > 0 else 0.0
            rows = apply_to & at
            q[rows] = c * p[rows]
    return np.where(log.mask, q, 0.0)


def hash_half(request_id: str) -> bool:
    """A stable coin per request id (the parity of its sha256's first byte)."""
    return hashlib.sha256(str(request_id).encode()).digest()[0] % 2 == 0


def evaluate(log: DecisionLog, reward: np.ndarray, target: TargetPolicy, head: str = "click"
             ) -> dict[str, OffPolicyEstimate]:
    """IPS, SNIPS and DR of ``target``'s value per decision on ``head`` (``models.ope``), plus
    ``logged``: the logging policy's own observed mean reward (its on-policy value).

    Raises:
        ValueError: as ``models.ope`` (no common support: a target action the log never could take).
    """
    pe = target.probabilities(log)
    q = cross_fitted_reward_model(log, reward, head)
    out = estimate_all(reward, log.propensity, log.action, pe, q, log.mask)
    ones = np.ones(len(log))
    out["logged"] = ips(reward, ones, ones)  # weight 1 everywhere: the plain mean of what was served
    return out


__all__ = ["DecisionLog", "OffPolicyDataError", "TargetPolicy", "cross_fitted_reward_model", "decision_rewards",
           "decisions_from_entries", "evaluate", "read_exploration_log"]
