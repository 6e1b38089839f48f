"""The promotion gate: a challenger version must not rank worse than the champion inside requests.

Before an alias moves to a new version (``home-mixer models promote``), both versions score the
same rows, now: the validation days of the state's training set (the last
``core.schema.VALIDATION_DAYS`` days, features as served). Per head, the request-level GAUC of each version is
compared (:func:`models.metrics.gauc` grouped by ``request_id``, the main offline metric):

- the light ranker's single P(engaged) score ranks every head; the heavy ranker ranks each head by
  its own probability;
- a head with at least :data:`MIN_GATING_POSITIVES` positive labels in the frame is *gating*: the
  challenger fails the check if its request GAUC there is below the champion's (ties pass);
- heads with fewer positives are reported (their GAUC is noise at that size) but do not gate;
- a head whose GAUC is undefined for either version (no request with both classes) is never worse.

Rolling back (promoting an older version) is the same check: an older version that ranks worse on
today's rows is refused too, unless the caller forces it (the CLI's ``--force``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.schema import CHAMPION_ALIAS, HEADS, VALIDATION_DAYS
from core.state import StateDir
from models import metrics as M

MIN_GATING_POSITIVES = 100


class TrainingSetMissingError(FileNotFoundError):
    """The state folder has no training set to compare versions on; the message says what to run."""


@dataclass(frozen=True)
class HeadComparison:
    """One head of a :class:`PromotionCheck`.

    Attributes:
        head: engagement head (``schema.HEADS``).
        positives: positive labels of the head in the compared frame (int >= 0).
        champion_gauc, challenger_gauc: request-level GAUC of each version (float in [0, 1], NaN
            when no request has both classes).
        gating: ``positives >= min_positives``: only gating heads can fail the check.
        worse: the challenger's request GAUC is strictly below the champion's (False when either
            is NaN); reported for every head, gating or not.
    """

    head: str
    positives: int
    champion_gauc: float
    challenger_gauc: float
    gating: bool
    worse: bool

    @property
    def blocks(self) -> bool:
        """True when this head fails the check: gating and worse."""
        return self.gating and self.worse


@dataclass(frozen=True)
class PromotionCheck:
    """Champion vs challenger request GAUC per head on the same rows.

    Attributes:
        name: registered model name.
        champion_version: version the alias points at now; challenger_version: version to promote.
        heads: one :class:`HeadComparison` per head, in ``schema.HEADS`` order.
        rows, requests: size of the compared frame (rows, distinct ``request_id``).
        days: the distinct ``date`` values (int yyyymmdd) of the frame, ascending.
        min_positives: the gating threshold used.
    """

    name: str
    champion_version: int
    challenger_version: int
    heads: tuple[HeadComparison, ...]
    rows: int
    requests: int
    days: tuple[int, ...] = ()
    min_positives: int = MIN_GATING_POSITIVES

    @property
    def passed(self) -> bool:
        """True when no gating head is worse."""
        return not self.blocking_heads

    @property
    def blocking_heads(self) -> tuple[HeadComparison, ...]:
        """Gating heads on which the challenger is worse (the reasons for a refusal)."""
        return tuple(h for h in self.heads if h.blocks)

    @property
    def worse_heads(self) -> tuple[HeadComparison, ...]:
        """Every head on which the challenger is worse, gating or not."""
        return tuple(h for h in self.heads if h.worse)

    def to_table(self) -> str:
        """A plain-text table: one line per head (positives, both GAUCs, gating, worse)."""
        days = f"{self.days[0]}..{self.days[-1]}" if self.days else "?"
        champ, chall = f"champion v{self.champion_version}", f"challenger v{self.challenger_version}"
        lines = [
            f"{self.name}: request GAUC on the validation days {days} "
            f"({self.rows} rows, {self.requests} requests); heads with >= {self.min_positives} positives gate",
            f"{'head':<10} {'positives':>9} {champ:>14} {chall:>16} {'gating':>7} {'worse':>6}",
        ]
        for h in self.heads:
            lines.append(f"{h.head:<10} {h.positives:>9d} {_fmt(h.champion_gauc):>14} "
                         f"{_fmt(h.challenger_gauc):>16} {'yes' if h.gating else 'no':>7} "
                         f"{'yes' if h.worse else 'no':>6}")
        lines.append("result: " + ("passed" if self.passed else
                                   "refused (worse on " + ", ".join(h.head for h in self.blocking_heads) + ")"))
        return "\n".join(lines)

    def describe(self, heads: Sequence[HeadComparison]) -> str:
        """``"click (0.6012 < champion 0.6234), ..."``: heads with both request GAUCs."""
        return ", ".join(f"{h.head} ({_fmt(h.challenger_gauc)} < champion {_fmt(h.champion_gauc)})"
                         for h in heads)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"


def head_scores(kind: str, heads: Sequence[str], predictions: np.ndarray) -> dict[str, np.ndarray]:
    """The score that ranks each of ``schema.HEADS`` for one ranker's predictions.

    Args:
        kind: ``"light"`` (one column, P(engaged), ranks every head) or ``"heavy"`` (one column per
            head, in ``heads`` order).
        heads: the ranker's output columns (``RankerHandle.heads``).
        predictions: ``float [N, len(heads)]`` (``RankerHandle.predict``).

    Returns:
        ``{head: float64 [N]}`` for every head of ``schema.HEADS``.

    Raises:
        ValueError: unknown kind, a shape that does not match ``heads``, or a heavy ranker missing
            a head of ``schema.HEADS``.
    """
    p = np.asarray(predictions, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(heads):
        raise ValueError(f"predictions of shape {p.shape} do not match the ranker's heads {list(heads)}")
    if kind == "light":
        if p.shape[1] != 1:
            raise ValueError(f"a light ranker has one output column, got {p.shape[1]}")
        return {h: p[:, 0] for h in HEADS}
    if kind == "heavy":
        missing = [h for h in HEADS if h not in heads]
        if missing:
            raise ValueError(f"the heavy ranker does not predict head(s) {missing}; re-train it with "
                             "`home-mixer train --model heavy`")
        return {h: p[:, list(heads).index(h)] for h in HEADS}
    raise ValueError(f"unknown ranker kind {kind!r}: expected 'light' or 'heavy'")


def compare_head_scores(frame: pd.DataFrame, champion: Mapping[str, np.ndarray],
                        challenger: Mapping[str, np.ndarray], *, name: str = "",
                        champion_version: int = 0, challenger_version: int = 0,
                        min_positives: int = MIN_GATING_POSITIVES) -> PromotionCheck:
    """Compare two versions' per-head scores on the same rows by request-level GAUC.

    Args:
        frame: the compared rows: ``request_id``, the ``schema.HEADS`` labels (0/1) and ``date``
            (int yyyymmdd, optional: reported only).
        champion, challenger: ``{head: float [N]}`` finite scores for every head of ``schema.HEADS``
            (see :func:`head_scores`), aligned with ``frame``'s rows.
        name, champion_version, challenger_version: recorded on the result.
        min_positives: heads with at least this many positives gate (>= 1).

    Returns:
        :class:`PromotionCheck` (``passed`` False when the challenger is worse on a gating head).

    Raises:
        KeyError: ``request_id``, a label column or a head's scores missing.
        ValueError: empty frame, ``min_positives < 1``, scores of the wrong length or not finite.
    """
    if min_positives < 1:
        raise ValueError(f"min_positives must be >= 1, got {min_positives}")
    if len(frame) == 0:
        raise ValueError("the frame to compare the versions on is empty")
    missing = [c for c in ("request_id", *HEADS) if c not in frame.columns]
    if missing:
        raise KeyError(f"the frame lacks column(s) {missing}; compare on a training set "
                       "(pipelines.training_set.load_training_set), which has requests and labels")
    requests = frame["request_id"].to_numpy()
    rows = []
    for head in HEADS:
        for who, scores in (("champion", champion), ("challenger", challenger)):
            if head not in scores:
                raise KeyError(f"no {who} scores for head {head!r}")
        y = frame[head].to_numpy()
        positives = int(np.asarray(y, dtype=np.float64).sum())
        champ = M.gauc(y, champion[head], requests)
        chall = M.gauc(y, challenger[head], requests)
        rows.append(HeadComparison(head=head, positives=positives, champion_gauc=champ, challenger_gauc=chall,
                                   gating=positives >= min_positives, worse=bool(chall < champ)))
    days = tuple(sorted(int(d) for d in pd.unique(frame["date"]))) if "date" in frame.columns else ()
    return PromotionCheck(name=name, champion_version=int(champion_version),
                          challenger_version=int(challenger_version), heads=tuple(rows), rows=len(frame),
                          requests=int(pd.Series(requests).nunique()), days=days, min_positives=min_positives)


def version_to_beat(name: str, version: int, alias: str = CHAMPION_ALIAS,
                    tracking_uri: str | None = None) -> int | None:
    """The version ``version`` must not be worse than before ``alias`` moves to it, or None.

    None means no check is needed: ``alias`` points nowhere yet (first promotion) or already points
    at ``version``.

    Raises:
        RankerNotFoundError: no store, registered model ``name`` or version ``version``.
    """
    from models.registry import model_aliases, registered_version

    registered_version(name, version, tracking_uri)
    current = model_aliases(name, tracking_uri).get(alias)
    return None if current is None or current == int(version) else current


def validation_frame(state: StateDir, valid_days: int = VALIDATION_DAYS) -> pd.DataFrame:
    """The last ``valid_days`` days of the state's training set: the rows versions are compared on.

    Returns:
        The training set's rows of those days (``pipelines.training_set`` columns: ``request_id``,
        ``date``, the labels, every feature).

    Raises:
        TrainingSetMissingError: the state has no training set (says to run ``home-mixer
            features build``).
        ValueError: the training set has no more than ``valid_days`` days.
    """
    from models.split import split_by_days
    from pipelines.training_set import TRAINING_SET_TABLE, load_training_set

    try:
        df = load_training_set(state)
    except FileNotFoundError:
        raise TrainingSetMissingError(
            f"no training set at {state.table(TRAINING_SET_TABLE)} to compare the versions on: "
            "run `home-mixer features build` first") from None
    return split_by_days(df, valid_days=valid_days)[1]


def compare_versions(name: str, champion_version: int, challenger_version: int, frame: pd.DataFrame,
                     tracking_uri: str | None = None,
                     min_positives: int = MIN_GATING_POSITIVES) -> PromotionCheck:
    """Load both versions from the registry, score ``frame`` and compare (:func:`compare_head_scores`).

    Args:
        name: registered model name; champion_version / challenger_version: versions to compare.
        frame: rows with ``request_id``, labels and the rankers' feature columns (e.g.
            :func:`validation_frame`).
        tracking_uri: MLflow URI; default ``StateDir.from_env().mlflow_tracking_uri``.

    Raises:
        RankerNotFoundError: a version does not exist.
        MissingFeaturesError: ``frame`` lacks a feature column of either version.
        ValueError / KeyError: as :func:`compare_head_scores` and :func:`head_scores`.
    """
    from models.registry import load_ranker_version

    scores = {}
    for role, version in (("champion", champion_version), ("challenger", challenger_version)):
        handle = load_ranker_version(name, version, tracking_uri)
        scores[role] = head_scores(handle.kind, handle.heads, handle.predict(frame))
    return compare_head_scores(frame, scores["champion"], scores["challenger"], name=name,
                               champion_version=champion_version, challenger_version=challenger_version,
                               min_positives=min_positives)
