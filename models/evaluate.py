"""Offline evaluation of the registered rankers on a featurised evaluation frame.

Given impressions with labels and features (the training-set contract), it loads the light and
heavy rankers by alias and reports:

- per head, AUC and GAUC of the light ranker's single score and of the heavy ranker's
  probability for that head;
- NDCG@k per user (mean over users with a positive gain) of four orderings of each user's
  impressions:
    ``blended``        score = sum_h weights[h] x heavy p_h (the weighted sum of predicted
                       engagement probabilities of Twitter's home mixer; negative weights, e.g.
                       hate, push a post down);
    ``light``          the light ranker's P(engaged);
    ``chronological``  newest post first: ``post_created_ts`` descending, ties by impression time
                       descending (posts of unknown age last);
    ``popularity``     ``post_impressions_24h`` descending (exposure in the last 24 h: the
                       trending signal that does not depend on the labels being evaluated; unknown
                       counts as 0), ties by impression time descending.

Gain of one impression (graded relevance) = sum_h max(weights[h], 0) x label_h: every positive
engagement adds its weight; negative feedback (hate) adds nothing, since NDCG needs non-negative
gains, and its effect is measured by the hate head's AUC instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import CHAMPION_ALIAS, HEADS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from models import metrics as M
from models.registry import load_ranker

# The example weights of the brief (a Twitter-like ordering of engagement value).
EXAMPLE_WEIGHTS: dict[str, float] = {
    "click": 1, "long_view": 2, "like": 4, "follow": 8, "comment": 6, "forward": 6, "hate": -20,
}
ORDERINGS: tuple[str, ...] = ("blended", "light", "chronological", "popularity")


@dataclass
class EvaluationReport:
    """Metrics of the rankers on one evaluation frame.

    Attributes:
        head_metrics: ``{"light" | "heavy": {head: {"auc": float, "gauc": float}}}`` (NaN where a
            head has a single class in the frame).
        ndcg: ``{ordering: mean NDCG@k}`` for :data:`ORDERINGS`.
        k: NDCG cut-off; weights: blending weights used (missing heads = 0).
        rows, users, users_with_gain: frame size, distinct users, users counted by NDCG.
        positives: ``{head: positive label count}``.
        models: ``{"light" | "heavy": "<name> v<version> (@<alias>, run <id>)"}``.
    """

    head_metrics: dict[str, dict[str, dict[str, float]]]
    ndcg: dict[str, float]
    k: int
    weights: dict[str, float]
    rows: int
    users: int
    users_with_gain: int
    positives: dict[str, int]
    models: dict[str, str] = field(default_factory=dict)

    def to_table(self) -> str:
        """A plain-text report: per-head AUC/GAUC table, then NDCG@k per ordering."""
        def fmt(v: float) -> str:
            return "   n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:6.4f}"

        lines = [
            f"Ranker evaluation: {self.rows} impressions, {self.users} users "
            f"({self.users_with_gain} with a positive gain)",
        ]
        lines += [f"  {kind:5s}: {desc}" for kind, desc in self.models.items()]
        lines.append("")
        header = f"{'head':10s} {'positives':>9s} | {'light AUC':>9s} {'light GAUC':>10s} | {'heavy AUC':>9s} {'heavy GAUC':>10s}"
        lines += [header, "-" * len(header)]
        for head in HEADS:
            lm = self.head_metrics["light"][head]
            hm = self.head_metrics["heavy"][head]
            lines.append(
                f"{head:10s} {self.positives[head]:9d} | {fmt(lm['auc']):>9s} {fmt(lm['gauc']):>10s} | "
                f"{fmt(hm['auc']):>9s} {fmt(hm['gauc']):>10s}"
            )
        lines += ["", f"NDCG@{self.k} per user (gain = sum of positive weights x labels)"]
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


def evaluate_rankers(
    eval_df: pd.DataFrame,
    weights: Mapping[str, float],
    tracking_uri: str | None = None,
    alias: str = CHAMPION_ALIAS,
    k: int = 10,
) -> EvaluationReport:
    """Evaluate the registered light and heavy rankers (loaded by ``alias``) on ``eval_df``.

    Args:
        eval_df: featurised impressions: user_id, event_timestamp, the ``schema.HEADS`` labels,
            every feature both rankers need, ``post_created_ts`` and ``post_impressions_24h``.
        weights: blending weight per head (missing heads weigh 0), e.g. :data:`EXAMPLE_WEIGHTS`.
        tracking_uri: MLflow URI (default ``StateDir.from_env().mlflow_tracking_uri``).
        alias: registry alias of both rankers.
        k: NDCG cut-off.

    Raises:
        ValueError: empty frame or unknown/non-finite weights.
        KeyError: label or ordering columns missing; MissingFeaturesError: features missing.
        RankerNotFoundError: a ranker or alias is not registered.
    """
    w = _check_weights(weights)
    if len(eval_df) == 0:
        raise ValueError("eval_df is empty")
    needed = ["user_id", "event_timestamp", *HEADS, "post_created_ts", "post_impressions_24h"]
    missing = [c for c in needed if c not in eval_df.columns]
    if missing:
        raise KeyError(f"eval_df lacks column(s) {missing}")

    light = load_ranker(LIGHT_RANKER_NAME, alias, tracking_uri)
    heavy = load_ranker(HEAVY_RANKER_NAME, alias, tracking_uri)
    light_p = light.predict(eval_df)[:, 0].astype(np.float64)
    heavy_p = heavy.predict(eval_df).astype(np.float64)
    head_index = {h: j for j, h in enumerate(heavy.heads)}
    if set(head_index) != set(HEADS):
        raise ValueError(f"{heavy.name} v{heavy.version} predicts heads {heavy.heads}, expected {HEADS}")

    users = eval_df["user_id"].to_numpy()
    head_metrics: dict[str, dict[str, dict[str, float]]] = {"light": {}, "heavy": {}}
    for head in HEADS:
        y = eval_df[head].to_numpy()
        p_h = heavy_p[:, head_index[head]]
        head_metrics["light"][head] = {"auc": M.auc(y, light_p), "gauc": M.gauc(y, light_p, users)}
        head_metrics["heavy"][head] = {"auc": M.auc(y, p_h), "gauc": M.gauc(y, p_h, users)}

    event_s = pd.to_datetime(eval_df["event_timestamp"], utc=True).astype("int64").to_numpy() / 1e9
    created = pd.to_numeric(eval_df["post_created_ts"], errors="coerce").to_numpy(dtype=np.float64)
    popularity = pd.to_numeric(eval_df["post_impressions_24h"], errors="coerce").fillna(0.0).to_numpy(dtype=np.float64)
    scores = {
        "blended": heavy_p @ np.array([w[h] for h in heavy.heads]),
        "light": light_p,
        "chronological": _order_score(created, event_s),
        "popularity": _order_score(popularity, event_s),
    }
    gain = impression_gain(eval_df, w)
    ndcg = {name: M.ndcg_at_k(gain, s, users, k) for name, s in scores.items()}
    users_with_gain = int(len(M.ndcg_per_user(gain, scores["light"], users, k)))

    return EvaluationReport(
        head_metrics=head_metrics,
        ndcg=ndcg,
        k=k,
        weights=w,
        rows=len(eval_df),
        users=int(pd.Series(users).nunique()),
        users_with_gain=users_with_gain,
        positives={h: int(eval_df[h].sum()) for h in HEADS},
        models={r.kind: f"{r.name} v{r.version} (@{r.alias}, run {r.run_id})" for r in (light, heavy)},
    )
