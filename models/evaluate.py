"""Offline evaluation of the registered rankers, as they are served: inside requests.

The frame comes from ``pipelines.training_set.served_feature_rows``: impressions grouped into
requests (``core.requests``) with the features the online store held when each request started.
Serving ranks the candidates of one request, so the main metric ranks inside requests too.

Per head, for three scorers on the same rows:
    ``popularity``  the post's smoothed prior rate of that head (``post_{head}_rate_total``): a
                    lookup table, the floor every model must beat;
    ``light``       the light ranker's single P(engaged) score;
    ``heavy``       the heavy ranker's probability for that head;
it reports AUC, request-level GAUC (the main metric) with a 95 % bootstrap interval over users,
user-level GAUC, and the number of requests and users that have both classes (the only ones a
GAUC can use). GAUC is the impression-weighted mean of per-group AUC (Zhou et al. 2018, DIN).

NDCG@k per request (mean over requests with two or more impressions and a positive gain: a
single impression has one order) of four orderings:
    ``blended``        score = sum_h weights[h] x heavy p_h (the weighted sum of predicted
                       engagement probabilities of Twitter's home mixer; negative weights, e.g.
                       hate, push a post down);
    ``light``          the light ranker's P(engaged);
    ``chronological``  newest post first: ``post_created_ts`` descending, ties by impression time
                       descending (posts of unknown age last);
    ``popularity``     sum_h weights[h] x ``post_{head}_rate_total``: the popularity lookup
                       blended with the same weights.

Gain of one impression (graded relevance) = sum_h max(weights[h], 0) x label_h: every positive
engagement adds its weight; negative feedback (hate) adds nothing, since NDCG needs non-negative
gains, and its effect is measured by the hate head's GAUC instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import CHAMPION_ALIAS, HEADS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME, post_prior_rate
from models import metrics as M
from models.registry import load_ranker

# The example weights of the brief (a Twitter-like ordering of engagement value).
EXAMPLE_WEIGHTS: dict[str, float] = {
    "click": 1, "long_view": 2, "like": 4, "follow": 8, "comment": 6, "forward": 6, "hate": -20,
}
ORDERINGS: tuple[str, ...] = ("blended", "light", "chronological", "popularity")
SCORERS: tuple[str, ...] = ("popularity", "light", "heavy")


# the feature that is the popularity lookup of a head: the post's smoothed prior rate
popularity_column = post_prior_rate


@dataclass
class EvaluationReport:
    """Metrics of the rankers and the popularity lookup on one evaluation frame.

    Attributes:
        head_metrics: ``{scorer: {head: {...}}}`` for scorer in :data:`SCORERS`; per head
            ``auc``, ``request_gauc``, ``request_gauc_ci`` (``[low, high]``, 95 % bootstrap over
            users), ``user_gauc`` (floats in [0, 1], NaN where undefined); the light and heavy
            rankers also carry ``vs_popularity``: ``[difference, low, high]`` of request GAUC minus
            the popularity lookup's, with its paired 95 % bootstrap interval over users
            (``metrics.gauc_difference_interval``).
        groups: ``{head: {"requests": n, "users": n}}`` with both classes.
        ndcg: ``{ordering: mean NDCG@k per request}`` for :data:`ORDERINGS`.
        k: NDCG cut-off; weights: blending weights used (missing heads = 0).
        rows, users, requests, requests_with_gain: frame size, distinct users and requests,
            requests counted by NDCG (two or more impressions and a positive gain);
            request_gap_s: the gap that cut the requests.
        positives: ``{head: positive label count}``.
        models: ``{"light" | "heavy": "<name> v<version> (@<alias>, run <id>)"}``.
    """

    head_metrics: dict[str, dict[str, dict]]
    groups: dict[str, dict[str, int]]
    ndcg: dict[str, float]
    k: int
    weights: dict[str, float]
    rows: int
    users: int
    requests: int
    requests_with_gain: int
    positives: dict[str, int]
    models: dict[str, str] = field(default_factory=dict)
    request_gap_s: float | None = None

    def to_table(self) -> str:
        """A plain-text report: per head and scorer AUC / request GAUC [CI] / user GAUC, then NDCG@k."""
        def fmt(v) -> str:
            return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

        gap = f", gap {self.request_gap_s / 60:g} min" if self.request_gap_s else ""
        lines = [
            f"Ranker evaluation as served: {self.rows} impressions, {self.users} users, "
            f"{self.requests} requests{gap}",
        ]
        lines += [f"  {kind:5s}: {desc}" for kind, desc in self.models.items()]
        lines.append("")
        header = (f"{'head':10s} {'pos':>6s} {'req grp':>7s} {'usr grp':>7s}  {'scorer':10s} "
                  f"{'AUC':>6s} {'req GAUC':>8s} {'95% interval':>17s} {'user GAUC':>9s}  "
                  f"{'req GAUC - popularity [95%]':>29s}")
        lines += [header, "-" * len(header)]
        for head in HEADS:
            g = self.groups[head]
            for i, scorer in enumerate(SCORERS):
                m = self.head_metrics[scorer][head]
                lo, hi = m["request_gauc_ci"]
                lead = (f"{head:10s} {self.positives[head]:6d} {g['requests']:7d} {g['users']:7d}" if i == 0
                        else " " * 33)
                diff = ""
                if "vs_popularity" in m:
                    d, dlo, dhi = (float("nan") if v is None else v for v in m["vs_popularity"])
                    diff = ("   n/a" if math.isnan(d) else
                            f"{d:+.4f} [{dlo:+.4f}, {dhi:+.4f}]" + (" *" if dlo > 0 else ""))
                lines.append(f"{lead}  {scorer:10s} {fmt(m['auc'])} {fmt(m['request_gauc']):>8s} "
                             f"  [{fmt(lo)}, {fmt(hi)}] {fmt(m['user_gauc']):>9s}  {diff}")
        lines.append("  * the paired bootstrap interval over users says the ranker beats popularity")
        lines += ["", f"NDCG@{self.k} per request ({self.requests_with_gain} requests of 2+ impressions with a "
                  "positive gain; gain = sum of positive weights x labels)"]
        weights = ", ".join(f"{h}={w:g}" for h, w in self.weights.items())
        lines.append(f"  weights: {weights}")
        for name in ORDERINGS:
            lines.append(f"  {name:14s} {fmt(self.ndcg[name])}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """JSON-ready dict (NaN becomes None)."""
        def clean(o):
            if isinstance(o, dict):
                return {k: clean(v) for k, v in o.items()}
            if isinstance(o, (list, tuple)):
                return [clean(v) for v in o]
            if isinstance(o, float) and math.isnan(o):
                return None
            return o

        return clean(asdict(self))

    def to_json(self, path: Path | str) -> Path:
        """Write :meth:`to_dict` as indented JSON to ``path`` (parents created); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False))
        return path


def _check_weights(weights: Mapping[str, float]) -> dict[str, float]:
    unknown = sorted(set(weights) - set(HEADS))
    if unknown:
        raise ValueError(f"unknown head(s) in weights: {unknown}; heads are {list(HEADS)}")
    out = {h: float(weights.get(h, 0.0)) for h in HEADS}
    if not all(math.isfinite(w) for w in out.values()):
        raise ValueError(f"weights must be finite numbers, got {dict(weights)}")
    return out


def impression_gain(frame: pd.DataFrame, weights: Mapping[str, float]) -> np.ndarray:
    """Graded relevance per row: ``sum_h max(weights[h], 0) * frame[h]``, ``float64 [N]``."""
    w = _check_weights(weights)
    labels = frame[list(HEADS)].to_numpy(dtype=np.float64)
    return labels @ np.array([max(w[h], 0.0) for h in HEADS])


def _order_score(primary_desc: np.ndarray, secondary_desc: np.ndarray) -> np.ndarray:
    """A score whose descending order is (primary desc, then secondary desc); NaN primary last."""
    primary = np.where(np.isnan(primary_desc), -np.inf, primary_desc)
    order = np.lexsort((secondary_desc, primary))  # ascending by primary, then secondary
    score = np.empty(len(order), dtype=np.float64)
    score[order] = np.arange(len(order), dtype=np.float64)
    return score


def score_metrics(y: np.ndarray, p: np.ndarray, requests: np.ndarray, users: np.ndarray,
                  n_boot: int = 1000, seed: int = 0) -> dict:
    """AUC, request GAUC with its bootstrap interval over users, and user GAUC of one score.

    Args:
        y: labels {0, 1} ``[N]``; p: finite scores ``[N]``; requests, users: group keys ``[N]``
            (each request inside one user).

    Returns:
        ``{"auc", "request_gauc", "request_gauc_ci": [low, high], "user_gauc"}``.
    """
    parts = M.group_aucs(y, p, requests)
    lo, hi = M.gauc_interval(y, p, requests, users, n_boot=n_boot, seed=seed, parts=parts)
    return {"auc": M.auc(y, p), "request_gauc": M.gauc_of_parts(parts), "request_gauc_ci": [lo, hi],
            "user_gauc": M.gauc(y, p, users)}


def evaluate_scores(eval_df: pd.DataFrame, light_p: np.ndarray, heavy_p: np.ndarray, heavy_heads,
                    weights: Mapping[str, float], k: int = 10, n_boot: int = 1000,
                    models: dict[str, str] | None = None, request_gap_s: float | None = None) -> EvaluationReport:
    """The report of :func:`evaluate_rankers` from scores already computed (no registry).

    Args:
        eval_df: served feature rows (see :func:`evaluate_rankers`).
        light_p: ``float64 [N]`` light ranker scores; heavy_p: ``float64 [N, H]`` heavy ranker
            probabilities, columns in ``heavy_heads`` order.
        weights: blending weight per head; k: NDCG cut-off; n_boot: bootstrap replicates.

    Raises:
        ValueError: empty frame, unknown/non-finite weights, shapes that do not match, heads
            other than ``HEADS``; KeyError: columns missing.
    """
    w = _check_weights(weights)
    if len(eval_df) == 0:
        raise ValueError("eval_df is empty")
    needed = ["user_id", "request_id", "event_timestamp", *HEADS, "post_created_ts",
              *(popularity_column(h) for h in HEADS)]
    missing = [c for c in needed if c not in eval_df.columns]
    if missing:
        hint = (" (build it with pipelines.training_set.served_feature_rows: requests and the features "
                "serving had)") if "request_id" in missing else ""
        raise KeyError(f"eval_df lacks column(s) {missing}{hint}")
    head_index = {h: j for j, h in enumerate(heavy_heads)}
    if set(head_index) != set(HEADS):
        raise ValueError(f"the heavy ranker predicts heads {list(heavy_heads)}, expected {list(HEADS)}")
    n = len(eval_df)
    if light_p.shape != (n,) or heavy_p.shape != (n, len(head_index)):
        raise ValueError(f"scores of shape {light_p.shape} / {heavy_p.shape} do not match {n} rows")

    users = eval_df["user_id"].to_numpy()
    requests = eval_df["request_id"].to_numpy()
    popularity = {h: pd.to_numeric(eval_df[popularity_column(h)], errors="coerce").fillna(0.0)
                  .to_numpy(dtype=np.float64) for h in HEADS}
    head_metrics: dict[str, dict[str, dict]] = {s: {} for s in SCORERS}
    groups: dict[str, dict[str, int]] = {}
    for head in HEADS:
        y = eval_df[head].to_numpy()
        scores = {"popularity": popularity[head], "light": light_p, "heavy": heavy_p[:, head_index[head]]}
        for scorer, p in scores.items():
            head_metrics[scorer][head] = score_metrics(y, p, requests, users, n_boot=n_boot)
            if scorer != "popularity":  # paired: same rows, same resampled users
                head_metrics[scorer][head]["vs_popularity"] = list(M.gauc_difference_interval(
                    y, p, popularity[head], requests, users, n_boot=n_boot))
        groups[head] = {"requests": M.groups_with_both_classes(y, requests),
                        "users": M.groups_with_both_classes(y, users)}

    event_s = pd.to_datetime(eval_df["event_timestamp"], utc=True).astype("int64").to_numpy() / 1e9
    created = pd.to_numeric(eval_df["post_created_ts"], errors="coerce").to_numpy(dtype=np.float64)
    orderings = {
        "blended": heavy_p @ np.array([w[h] for h in heavy_heads]),
        "light": light_p,
        "chronological": _order_score(created, event_s),
        "popularity": sum(w[h] * popularity[h] for h in HEADS),
    }
    gain = impression_gain(eval_df, w)
    # A request of one impression has one order: NDCG 1 for every ordering, so it says nothing.
    multi = pd.Series(requests).map(pd.Series(requests).value_counts()).to_numpy() >= 2
    per_request = {name: M.ndcg_per_user(gain[multi], s[multi], requests[multi], k) for name, s in orderings.items()}
    ndcg = {name: float(v.mean()) if len(v) else float("nan") for name, v in per_request.items()}
    return EvaluationReport(
        head_metrics=head_metrics,
        groups=groups,
        ndcg=ndcg,
        k=k,
        weights=w,
        rows=n,
        users=int(pd.Series(users).nunique()),
        requests=int(pd.Series(requests).nunique()),
        requests_with_gain=len(per_request["light"]),
        positives={h: int(eval_df[h].sum()) for h in HEADS},
        models=models or {},
        request_gap_s=request_gap_s,
    )


def evaluate_rankers(
    eval_df: pd.DataFrame,
    weights: Mapping[str, float],
    tracking_uri: str | None = None,
    alias: str = CHAMPION_ALIAS,
    k: int = 10,
    n_boot: int = 1000,
    request_gap_s: float | None = None,
) -> EvaluationReport:
    """Evaluate the registered light and heavy rankers (loaded by ``alias``) on ``eval_df``.

    Args:
        eval_df: served feature rows (``pipelines.training_set.served_feature_rows``): user_id,
            request_id, event_timestamp, the ``HEADS`` labels, every feature both rankers need,
            ``post_created_ts`` and ``post_{head}_rate_total`` of every head.
        weights: blending weight per head (missing heads weigh 0), e.g. :data:`EXAMPLE_WEIGHTS`.
        tracking_uri: MLflow URI (default ``StateDir.from_env().mlflow_tracking_uri``).
        alias: registry alias of both rankers.
        k: NDCG cut-off; n_boot: bootstrap replicates of the request-GAUC intervals.
        request_gap_s: the gap that cut the requests (reported only).

    Raises:
        ValueError: empty frame or unknown/non-finite weights.
        KeyError: label, request or ordering columns missing; MissingFeaturesError: features missing.
        RankerNotFoundError: a ranker or alias is not registered.
    """
    light = load_ranker(LIGHT_RANKER_NAME, alias, tracking_uri)
    heavy = load_ranker(HEAVY_RANKER_NAME, alias, tracking_uri)
    light_p = light.predict(eval_df)[:, 0].astype(np.float64)
    heavy_p = heavy.predict(eval_df).astype(np.float64)
    return evaluate_scores(
        eval_df, light_p, heavy_p, heavy.heads, weights, k=k, n_boot=n_boot, request_gap_s=request_gap_s,
        models={r.kind: f"{r.name} v{r.version} (@{r.alias}, run {r.run_id})" for r in (light, heavy)},
    )
