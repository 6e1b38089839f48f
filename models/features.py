"""Feature matrices for the rankers, and the heavy ranker's input normalisation statistics.

Missing values (NaN) are part of the contract: a cold user or post has no row in a feature view,
so the point-in-time join (and online hydration) leaves its features NaN.

- The light ranker (LightGBM) takes NaN natively: each split learns a default direction for
  missing values (Ke et al. 2017, LightGBM; ``use_missing=true``), so no imputation is done.
- The heavy ranker (an MLP) cannot take NaN. Its ``nn.Module`` imputes every NaN with the
  training median of that feature, applies ``log1p`` to heavy-tailed non-negative counts, and
  standardises; the statistics are fitted on the training data by :meth:`InputNormalisation.fit`
  and stored as buffers inside the module, so the exported model needs no outside preprocessing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


class MissingFeaturesError(KeyError):
    """A frame lacks feature columns a ranker needs; the message lists them."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def feature_matrix(frame: pd.DataFrame, feature_names: Sequence[str]) -> np.ndarray:
    """The ``float32`` matrix of ``feature_names`` (in that order) from ``frame``.

    Args:
        frame: any frame holding at least the feature columns (extra columns are ignored).
            Values may be int, float, bool, pandas nullable (``Int64``/``Float64`` with ``<NA>``)
            or object columns holding numbers and ``None`` (as Feast returns for missing rows).
        feature_names: the columns to take, in model input order.

    Returns:
        ``np.ndarray`` of dtype ``float32`` and shape ``[len(frame), len(feature_names)]``,
        C-contiguous. Missing values (``None``, ``<NA>``, NaN) and ``±inf`` become NaN (an
        infinite rate or ratio is treated as unknown rather than passed to the model).

    Raises:
        MissingFeaturesError: some feature columns are absent; the message lists all of them.
        TypeError: some feature columns hold non-numeric values (e.g. strings); the message
            lists them.
    """
    names = list(feature_names)
    if frame.columns.is_unique:  # the mixer's frames and training sets: by position, at once
        idx = frame.columns.get_indexer(names)
        if (idx >= 0).all():
            kinds = [dt.kind if isinstance(dt, np.dtype) else "" for dt in frame.dtypes.to_numpy()]
            if all(kinds[i] == "f" for i in idx):
                # an all-float frame converts as one block (cheaper than selecting columns first)
                whole = all(k == "f" for k in kinds)
                out = frame.to_numpy(dtype=np.float32)[:, idx] if whole else \
                    frame.iloc[:, idx].to_numpy(dtype=np.float32)
                out[~np.isfinite(out)] = np.nan
                return np.ascontiguousarray(out)
    missing = [n for n in names if n not in frame.columns]
    if missing:
        raise MissingFeaturesError(
            f"frame lacks {len(missing)} feature column(s) the ranker needs: {missing}. "
            "Build the frame with the Feast training-set / hydration code plus "
            "core.request_features.add_request_features, which produce every feature of "
            "core.schema.ALL_FEATURES."
        )
    if all(isinstance(dt, np.dtype) and dt.kind == "f" for dt in frame.dtypes[names]):  # repeated column names
        out = frame[names].to_numpy(dtype=np.float32)
        out[~np.isfinite(out)] = np.nan
        return np.ascontiguousarray(out)
    out = np.empty((len(frame), len(names)), dtype=np.float32)
    bad: list[str] = []
    for j, name in enumerate(names):
        col = frame[name]
        if col.dtype == object:
            col = pd.to_numeric(col, errors="coerce").where(col.notna())
            if col.isna().sum() > frame[name].isna().sum():
                bad.append(name)
                continue
        try:
            out[:, j] = col.to_numpy(dtype=np.float32, na_value=np.nan)
        except (TypeError, ValueError):
            bad.append(name)
    if bad:
        raise TypeError(
            f"feature column(s) {bad} hold non-numeric values; features must be numbers "
            "(NaN/None for missing). Check the feature table's dtypes against core.schema."
        )
    out[~np.isfinite(out)] = np.nan
    return out


# A column gets log1p if it is non-negative, reaches above 1 (so it is a count or an amount,
# not a rate or a flag in [0, 1]) and its sample skewness exceeds 2 (heavily right-tailed; a
# common rule of thumb, e.g. Kim 2013, "Statistical notes for clinical researchers: assessing
# normal distribution (2) using skewness and kurtosis", where |skew| > 2 is substantial).
LOG1P_MIN_SKEW = 2.0


@dataclass(frozen=True)
class InputNormalisation:
    """Per-feature statistics of the heavy ranker's input transform, fitted on training data.

    The transform of one value ``x`` of feature ``j`` is::

        x <- median[j]              if x is NaN
        x <- log1p(max(x, 0))       if log1p[j]
        z  = (x - mean[j]) / std[j] clipped to [-clip, clip]

    All arrays are ``float32`` of shape ``[F]`` (``log1p`` is ``bool``); ``mean``/``std`` are
    measured after imputation and log1p, so ``z`` has mean 0 and variance 1 on the training data.
    """

    feature_names: tuple[str, ...]
    median: np.ndarray
    log1p: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    clip: float = 10.0

    @classmethod
    def fit(cls, x: np.ndarray, feature_names: Sequence[str], clip: float = 10.0) -> "InputNormalisation":
        """Fit the statistics on a training matrix.

        Args:
            x: ``float32``/``float64`` array ``[N, F]`` from :func:`feature_matrix` (NaN allowed).
            feature_names: the ``F`` column names (kept for the record and for error messages).
            clip: bound of the standardised value; outliers past ``clip`` standard deviations
                (e.g. a drifted count at serving time) are clipped instead of saturating the MLP.

        Decisions, all from the training data only:
            - median: ``nanmedian`` of the column; 0 for a column that is entirely NaN.
            - log1p: min >= 0, max > 1 and skewness > ``LOG1P_MIN_SKEW`` over non-NaN values.
            - std: 1 where the transformed column is constant (the feature then contributes 0).

        Raises:
            ValueError: ``x`` is not 2-D, has no rows, or its width differs from the names.
        """
        names = tuple(feature_names)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != len(names):
            raise ValueError(
                f"expected a non-empty [N, {len(names)}] matrix for {len(names)} features, "
                f"got shape {x.shape}"
            )
        x64 = np.asarray(x, dtype=np.float64)
        nan = np.isnan(x64)
        all_nan = nan.all(axis=0)
        median = np.zeros(x64.shape[1])
        if (~all_nan).any():
            median[~all_nan] = np.nanmedian(x64[:, ~all_nan], axis=0)
        log1p = np.zeros(x64.shape[1], dtype=bool)
        for j in np.flatnonzero(~all_nan):
            v = x64[~nan[:, j], j]
            if v.min() >= 0 and v.max() > 1 and _skewness(v) > LOG1P_MIN_SKEW:
                log1p[j] = True
        filled = np.where(nan, median, x64)
        filled[:, log1p] = np.log1p(np.maximum(filled[:, log1p], 0.0))
        mean = filled.mean(axis=0)
        std = filled.std(axis=0)
        std[std < 1e-6] = 1.0
        return cls(
            feature_names=names,
            median=median.astype(np.float32),
            log1p=log1p,
            mean=mean.astype(np.float32),
            std=std.astype(np.float32),
            clip=float(clip),
        )

    def transform(self, x: np.ndarray) -> np.ndarray:
        """Apply the transform in numpy (the module does the same in torch): ``[N, F]`` float32."""
        x = np.asarray(x, dtype=np.float32)
        x = np.where(np.isnan(x), self.median, x)
        x = np.where(self.log1p, np.log1p(np.maximum(x, 0.0)), x)
        return np.clip((x - self.mean) / self.std, -self.clip, self.clip).astype(np.float32)

    def log1p_features(self) -> list[str]:
        """Names of the features that get log1p."""
        return [n for n, flag in zip(self.feature_names, self.log1p) if flag]


def _skewness(v: np.ndarray) -> float:
    """Fisher-Pearson sample skewness ``m3 / m2**1.5`` (0 for a constant sample)."""
    d = v - v.mean()
    m2 = float(np.mean(d * d))
    if m2 <= 1e-12:
        return 0.0
    return float(np.mean(d * d * d) / m2**1.5)
