"""Light ranker: a small LightGBM binary classifier of "any positive engagement".

It scores every candidate, so it is kept cheap: ``schema.LIGHT_RANKER_FEATURES`` (17 features),
at most 200 trees of 31 leaves, early-stopped on the last training day. Missing features stay NaN
(LightGBM learns a default direction per split). Target ``engaged`` = 1 if any head of
``schema.POSITIVE_HEADS`` (click, long_view, like, follow, comment, forward) is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import lightgbm as lgb
import numpy as np
import pandas as pd

from core.schema import CANDIDATE_LIGHT_RANKER_FEATURES, LIGHT_RANKER_FEATURES, POSITIVE_HEADS
from models.features import feature_matrix
from models.split import split_calibration_day

LIGHT_HEADS: tuple[str, ...] = ("engaged",)


def engaged_label(frame: pd.DataFrame) -> np.ndarray:
    """``int8`` array ``[N]``: 1 where any of ``schema.POSITIVE_HEADS`` is 1, else 0.

    Raises:
        KeyError: a positive head's label column is missing (the message names it).
    """
    missing = [h for h in POSITIVE_HEADS if h not in frame.columns]
    if missing:
        raise KeyError(f"frame lacks label column(s) {missing}; training sets carry every head of schema.HEADS")
    return (frame[list(POSITIVE_HEADS)].to_numpy(dtype=np.float64) > 0).any(axis=1).astype(np.int8)


@dataclass(frozen=True)
class LightRankerParams:
    """LightGBM settings. Defaults favour a cheap, stable model (values are common defaults)."""

    num_boost_round: int = 200
    early_stopping_rounds: int = 20
    learning_rate: float = 0.05
    num_leaves: int = 31
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    bagging_freq: int = 1
    lambda_l2: float = 1.0
    num_threads: int = 2
    seed: int = 7
    extra: dict = field(default_factory=dict)

    def lgb_params(self) -> dict:
        """The ``lightgbm.train`` parameter dict (deterministic on a fixed thread count)."""
        p = {
            "objective": "binary",
            "metric": "binary_logloss",
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq,
            "lambda_l2": self.lambda_l2,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }
        p.update(self.extra)
        return p

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


@dataclass
class LightRankerFit:
    """A trained light ranker.

    Attributes:
        booster: the LightGBM booster (``best_iteration`` set by early stopping).
        feature_names: input columns, in order.
        best_iteration: number of trees used for prediction.
        fit_rows / calibration_rows: rows of the fit part and of the early-stopping day.
    """

    booster: lgb.Booster
    feature_names: tuple[str, ...]
    best_iteration: int
    fit_rows: int
    calibration_rows: int

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """P(engaged) per row: ``float32 [N, 1]`` (frame needs the feature columns; NaN allowed)."""
        return predict_booster(self.booster, feature_matrix(frame, self.feature_names))


def predict_booster(booster: lgb.Booster, x: np.ndarray, num_threads: int = 0) -> np.ndarray:
    """Probabilities of a binary booster on ``x`` (``float32 [N, F]``) as ``float32 [N, 1]``,
    on ``num_threads`` OpenMP threads (0: LightGBM's default, all cores)."""
    if len(x) == 0:
        return np.zeros((0, 1), dtype=np.float32)
    threads = {"num_threads": num_threads} if num_threads > 0 else {}
    p = booster.predict(x, num_iteration=booster.best_iteration or None, **threads)
    return np.asarray(p, dtype=np.float32).reshape(-1, 1)


def fit_light_ranker(
    train: pd.DataFrame,
    params: LightRankerParams | None = None,
    feature_names: Sequence[str] = LIGHT_RANKER_FEATURES,
    init_model: lgb.Booster | None = None,
) -> LightRankerFit:
    """Train on all but the last day of ``train``; early-stop on the last day.

    Args:
        train: training set (see ``models.train``): ``date``, the positive-head label columns and
            the feature columns.
        params: LightGBM settings (default :class:`LightRankerParams`).
        feature_names: input columns (default ``schema.LIGHT_RANKER_FEATURES``).
        init_model: continue boosting from this booster (an incremental update: up to
            ``params.num_boost_round`` trees are added to its trees, fit on ``train`` alone;
            LightGBM's ``init_model``); its feature names must be ``feature_names``.

    Raises:
        ValueError: fewer than 2 days, the fit part has a single class, or ``init_model`` reads
            other features.
        KeyError / MissingFeaturesError: label or feature columns are missing.
    """
    params = params or LightRankerParams()
    names = tuple(feature_names)
    if init_model is not None and tuple(init_model.feature_name()) != names:
        raise ValueError(f"the booster to continue reads {init_model.feature_name()}, not {list(names)}: "
                         "train it in full instead")
    fit_df, cal_df = split_calibration_day(train)
    y_fit, y_cal = engaged_label(fit_df), engaged_label(cal_df)
    if y_fit.min() == y_fit.max():
        raise ValueError("the fit part has a single class of 'engaged'; need both to train")
    d_fit = lgb.Dataset(feature_matrix(fit_df, names), label=y_fit, feature_name=list(names),
                        free_raw_data=True)
    d_cal = lgb.Dataset(feature_matrix(cal_df, names), label=y_cal, reference=d_fit)
    booster = lgb.train(
        params.lgb_params(),
        d_fit,
        num_boost_round=params.num_boost_round,
        valid_sets=[d_cal],
        valid_names=["calibration"],
        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
        init_model=init_model,
    )
    # with init_model the iterations count on from its trees: best_iteration covers old and new
    best = booster.best_iteration or booster.current_iteration()
    booster.best_iteration = best
    return LightRankerFit(booster, names, best, len(fit_df), len(cal_df))


def user_holdout(users: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``bool [N]``: rows whose user falls in a seeded ``share`` of the distinct users (all of a
    user's rows on one side, so early stopping sees users it did not fit).

    Raises:
        ValueError: ``share`` outside (0, 1) or fewer than 2 distinct users.
    """
    distinct = np.unique(users)
    if not 0.0 < share < 1.0 or len(distinct) < 2:
        raise ValueError(f"need 0 < share < 1 and >= 2 users to hold some out (share {share}, "
                         f"{len(distinct)} users)")
    chosen = np.random.default_rng(seed).choice(distinct, size=max(1, int(round(share * len(distinct)))),
                                                replace=False)
    return np.isin(users, chosen)


def fit_light_ranker_on_candidates(
    frame: pd.DataFrame,
    params: LightRankerParams | None = None,
    feature_names: Sequence[str] = CANDIDATE_LIGHT_RANKER_FEATURES,
    holdout_share: float = 0.1,
    label: str = "engaged",
) -> LightRankerFit:
    """Train the light ranker on the mixer's candidate sets (``home_mixer.candidate_training``).

    Binary log loss on ``label`` (1: the user engaged with the candidate on the label days), rows
    weighted by ``weight`` (the inverse negative-sampling rate) when present; early-stopped on a
    ``holdout_share`` of the users (seeded by ``params.seed``).

    Args:
        frame: ``user_id``, ``label``, the feature columns, optionally ``weight``.
        params: LightGBM settings (default :class:`LightRankerParams` with ``min_data_in_leaf``
            50: positives are rare, about 1 % of the sampled rows).
        feature_names: input columns (default ``schema.CANDIDATE_LIGHT_RANKER_FEATURES``).

    Returns:
        ``LightRankerFit`` (``calibration_rows`` = the held-out users' rows).

    Raises:
        KeyError / MissingFeaturesError: label or feature columns are missing.
        ValueError: a side of the split has a single class, or too few users to hold out.
    """
    params = params or LightRankerParams(min_data_in_leaf=50)
    names = tuple(feature_names)
    if label not in frame.columns or "user_id" not in frame.columns:
        raise KeyError(f"frame needs 'user_id' and label column {label!r}; "
                       "build it with home_mixer.candidate_training.candidate_training_set")
    held = user_holdout(frame["user_id"].to_numpy(), holdout_share, params.seed)
    y = frame[label].to_numpy(dtype=np.float64)
    for side, mask in (("fit", ~held), ("held-out", held)):
        if len(np.unique(y[mask])) < 2:
            raise ValueError(f"the {side} users have a single class of {label!r}; need positives and negatives")
    w = frame["weight"].to_numpy(dtype=np.float64) if "weight" in frame.columns else np.ones(len(frame))
    x = feature_matrix(frame, names)
    d_fit = lgb.Dataset(x[~held], label=y[~held], weight=w[~held], feature_name=list(names), free_raw_data=True)
    d_cal = lgb.Dataset(x[held], label=y[held], weight=w[held], reference=d_fit)
    booster = lgb.train(params.lgb_params(), d_fit, num_boost_round=params.num_boost_round, valid_sets=[d_cal],
                        valid_names=["held_out_users"],
                        callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False)])
    best = booster.best_iteration or booster.current_iteration()
    booster.best_iteration = best
    return LightRankerFit(booster, names, best, int((~held).sum()), int(held.sum()))
