"""Training runs: fit a ranker, measure it on the validation days, log it all to MLflow, register.

Each call is one MLflow run in the experiment ``home-mixer-rankers`` (artifacts under
``StateDir.mlflow_artifacts``) with:
- params: model settings, row and day counts, per-head positive weights (heavy; also its MMoE
  settings ``n_experts``/``hidden``/``tower`` and ``prior_offset_heads``, the heads whose logit is
  offset by their popularity prior);
- metrics on the validation frame, named ``valid_<head>_<metric>`` (auc, gauc, log_loss, ece;
  ``valid_<head>_ece_uncalibrated`` for the heavy ranker before Platt scaling; the light ranker's
  single score gets ``valid_engaged_*`` plus auc/gauc against every head of ``schema.HEADS``);
- artifacts: ``features.json`` (inputs, heads, and the heavy ranker's log1p features),
  ``metrics.json`` (the same metrics nested by head, plus label counts); the heavy ranker with
  ``ablation=True`` also logs ``ablation.json`` (MLflow table: one row per feature group of
  ``schema.FEATURE_GROUPS`` removed, request GAUC per head and its change; see ``heavy_ablation``);
- the model (see ``models.registry``), registered as ``schema.LIGHT_RANKER_NAME`` /
  ``schema.HEAVY_RANKER_NAME``, with alias ``schema.CHAMPION_ALIAS`` moved to the new version
  unless ``set_champion=False``.

Input frames follow the training-set contract: user_id, post_id, author_id, event_timestamp,
date (int yyyymmdd), the label columns of ``schema.HEADS`` (0/1), and the feature columns.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from core.schema import (
    CANDIDATE_LIGHT_RANKER_FEATURES, CHAMPION_ALIAS, FEATURE_GROUPS, HEADS, HEAVY_RANKER_FEATURES, HEAVY_RANKER_NAME,
    LIGHT_RANKER_FEATURES, LIGHT_RANKER_NAME,
)
from core.state import StateDir
from models import metrics as M
from models.features import feature_matrix
from models.heavy_ranker import HeavyRankerParams, fit_heavy_ranker
from models.light_ranker import LIGHT_HEADS, LightRankerParams, engaged_label, fit_light_ranker
from models.registry import (
    ensure_experiment, log_heavy_model, log_light_model, mlflow_uris, promote,
)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one training run.

    Attributes:
        run_id: the MLflow run id.
        model_version: registered version number, or None when ``register=False``.
        metrics: flat ``{"valid_<head>_<metric>": value}`` as logged to MLflow (NaN where a metric
            is undefined, e.g. a head without positives in the validation days).
        model: the in-memory fitted ranker (``LightRankerFit`` or ``HeavyRankerFit``), e.g. for
            an exporter that runs right after training.
        ablation: the heavy ranker's ablation table when requested (``heavy_ablation``), else None.
    """

    run_id: str
    model_version: int | None
    metrics: dict[str, float]
    model: Any = field(default=None, repr=False, compare=False)
    ablation: pd.DataFrame | None = field(default=None, repr=False, compare=False)


def head_metrics(y: np.ndarray, p: np.ndarray, users: np.ndarray, calibration: bool = True,
                 requests: np.ndarray | None = None) -> dict[str, float]:
    """AUC, user GAUC, request GAUC (and log loss, ECE if ``calibration``) of ``p`` for labels ``y``.

    ``request_gauc`` (the main ranking metric: serving ranks inside a request) is there when
    ``requests`` (request id per row, ``core.requests``) is given. Also returns ``positives`` and
    ``rows`` for context. Shapes: ``[N]`` each.
    """
    out = {"auc": M.auc(y, p), "gauc": M.gauc(y, p, users)}
    if requests is not None:
        out["request_gauc"] = M.gauc(y, p, requests)
    if calibration:
        out["log_loss"] = M.log_loss(y, p)
        out["ece"] = M.expected_calibration_error(y, p)
    out["positives"] = float(np.sum(y))
    out["rows"] = float(len(y))
    return out


def _requests(frame: pd.DataFrame) -> np.ndarray | None:
    """Request ids of a served-features frame (``pipelines.training_set``), else None."""
    return frame["request_id"].to_numpy() if "request_id" in frame.columns else None


def _flat(nested: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"valid_{head}_{k}": v for head, d in nested.items() for k, v in d.items()
            if k not in ("positives", "rows")}


def _require_rows(train_df: pd.DataFrame, valid_df: pd.DataFrame) -> None:
    if len(train_df) == 0 or len(valid_df) == 0:
        raise ValueError(
            f"training needs non-empty train and validation frames (got {len(train_df)} and "
            f"{len(valid_df)} rows); build them with models.split.split_by_days"
        )


def _days(df: pd.DataFrame) -> str:
    days = sorted(int(d) for d in pd.unique(df["date"]))
    return f"{days[0]}-{days[-1]} ({len(days)})"


def _log_run_data(params: dict, nested: dict, features: dict) -> dict[str, float]:
    import mlflow

    mlflow.log_params({k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in params.items()})
    flat = _flat(nested)
    # MLflow stores NaN fine in SQLite, but skip it so UI charts stay clean; metrics.json keeps all
    mlflow.log_metrics({k: v for k, v in flat.items() if math.isfinite(v)})
    mlflow.log_dict(features, "features.json")
    # strict JSON: an undefined metric (NaN) is written as null
    mlflow.log_dict({h: {k: (v if math.isfinite(v) else None) for k, v in d.items()} for h, d in nested.items()},
                    "metrics.json")
    return flat


def _finish(state: StateDir, name: str, info, register: bool, set_champion: bool) -> int | None:
    if not register:
        return None
    version = int(info.registered_model_version)
    if set_champion:
        promote(name, version, CHAMPION_ALIAS, tracking_uri=state.mlflow_tracking_uri)
    return version


def train_light(
    train_df: pd.DataFrame,
    valid_df: pd.DataFrame,
    state: StateDir,
    register: bool = True,
    set_champion: bool = True,
    params: LightRankerParams | None = None,
    feature_names: Sequence[str] = LIGHT_RANKER_FEATURES,
) -> TrainResult:
    """Train, evaluate, log and register the light ranker (LightGBM, target ``engaged``).

    Args:
        train_df: training days (the last one is the early-stopping slice).
        valid_df: validation days (metrics only).
        state: state folder: MLflow URI and artifact location.
        register: register the model as ``schema.LIGHT_RANKER_NAME``.
        set_champion: move alias ``champion`` to the new version (needs ``register``).
        params: LightGBM settings; feature_names: input columns.

    Raises:
        ValueError: empty frames or fewer than 2 training days.
        KeyError / MissingFeaturesError: label or feature columns missing.
    """
    _require_rows(train_df, valid_df)
    params = params or LightRankerParams()
    started = time.monotonic()
    fit = fit_light_ranker(train_df, params, feature_names)
    seconds = time.monotonic() - started

    run_params = {
        **params.as_dict(),
        "ranker": "light", "objective": "impressions", "n_features": len(fit.feature_names),
        "best_iteration": fit.best_iteration, "fit_rows": fit.fit_rows, "calibration_rows": fit.calibration_rows,
        "valid_rows": len(valid_df), "train_days": _days(train_df), "valid_days": _days(valid_df),
        "train_seconds": round(seconds, 2),
    }
    return _log_light(state, fit, valid_df, run_params, {}, register, set_champion)


def _log_light(state: StateDir, fit, valid_df: pd.DataFrame, run_params: dict, extra: dict[str, dict],
               register: bool, set_champion: bool) -> TrainResult:
    """Measure a light ranker on the validation impressions, log the run (plus ``extra`` nested
    metrics), register it as ``schema.LIGHT_RANKER_NAME``."""
    import mlflow

    p = fit.predict(valid_df)[:, 0]
    users = valid_df["user_id"].to_numpy()
    requests = _requests(valid_df)
    nested = {"engaged": head_metrics(engaged_label(valid_df), p, users, requests=requests)}
    for head in HEADS:  # how well the single score ranks each engagement
        nested[head] = head_metrics(valid_df[head].to_numpy(), p, users, calibration=False, requests=requests)
    nested |= extra
    features = {"feature_names": list(fit.feature_names), "heads": list(LIGHT_HEADS)}

    state.ensure()
    uri = state.mlflow_tracking_uri
    with mlflow_uris(uri):
        exp_id = ensure_experiment(uri, state.mlflow_artifacts)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"light-{time.strftime('%Y%m%d-%H%M%S')}",
                              tags={"ranker": "light", "objective": run_params.get("objective", "")},
                              nested=mlflow.active_run() is not None) as run:
            flat = _log_run_data(run_params, nested, features)
            info = log_light_model(fit.booster, fit.feature_names, LIGHT_HEADS,
                                   LIGHT_RANKER_NAME if register else None)
    version = _finish(state, LIGHT_RANKER_NAME, info, register, set_champion)
    return TrainResult(run.info.run_id, version, flat, fit)


def train_light_on_candidates(
    candidates: pd.DataFrame,
    valid_df: pd.DataFrame,
    state: StateDir,
    register: bool = True,
    set_champion: bool = True,
    params: LightRankerParams | None = None,
    feature_names: Sequence[str] = CANDIDATE_LIGHT_RANKER_FEATURES,
    context: dict | None = None,
) -> TrainResult:
    """Train the light ranker on the mixer's candidate sets, log and register it like :func:`train_light`.

    Args:
        candidates: ``home_mixer.candidate_training.CandidateTrainingSet.frame`` (labels from the
            days after its cutoff, all before ``valid_df``'s days).
        valid_df: validation impressions (the same metrics as :func:`train_light`, so the promotion
            gate compares like with like); the held-out users' candidate rows add
            ``valid_candidates_engaged_auc`` / ``_gauc`` (per user, sampling-weighted rows unweighted).
        context: extra run params (cutoff, label days, users...).

    Raises:
        ValueError / KeyError: see ``models.light_ranker.fit_light_ranker_on_candidates``; empty frames.
    """
    from models.light_ranker import fit_light_ranker_on_candidates, user_holdout

    _require_rows(candidates, valid_df)
    params = params or LightRankerParams(min_data_in_leaf=50)
    started = time.monotonic()
    fit = fit_light_ranker_on_candidates(candidates, params, feature_names)
    seconds = time.monotonic() - started
    held = user_holdout(candidates["user_id"].to_numpy(), 0.1, params.seed)
    rows = candidates.loc[held]
    p = fit.predict(rows)[:, 0]
    y = rows["engaged"].to_numpy()
    extra = {"candidates_engaged": {"auc": M.auc(y, p), "gauc": M.gauc(y, p, rows["user_id"].to_numpy()),
                                    "positives": float(y.sum()), "rows": float(len(y))}}
    run_params = {
        **params.as_dict(), **(context or {}),
        "ranker": "light", "objective": "candidate_sets", "n_features": len(fit.feature_names),
        "best_iteration": fit.best_iteration, "fit_rows": fit.fit_rows, "calibration_rows": fit.calibration_rows,
        "valid_rows": len(valid_df), "candidate_positives": int(candidates["engaged"].sum()),
        "valid_days": _days(valid_df), "train_seconds": round(seconds, 2),
    }
    return _log_light(state, fit, valid_df, run_params, extra, register, set_champion)


# A head's ablation deltas are reported for heads with at least this many validation positives
# (the promotion gate's threshold); rarer heads have too few requests with both classes.
ABLATION_MIN_POSITIVES = 100


def heavy_ablation(train_df: pd.DataFrame, valid_df: pd.DataFrame, params: HeavyRankerParams,
                   feature_names: Sequence[str] = HEAVY_RANKER_FEATURES,
                   groups: dict[str, Sequence[str]] | None = None, baseline: np.ndarray | None = None,
                   noise_seeds: int = 3, log=print) -> pd.DataFrame:
    """Leave-one-group-out ablation of the heavy ranker: what each feature group is worth.

    Trains the heavy ranker once per group of ``groups`` (default ``schema.FEATURE_GROUPS``) with
    that group's features removed (same params and seed), and scores the validation rows. The
    full model is also retrained with ``noise_seeds - 1`` other seeds: the spread of its request
    GAUC over seeds is the training noise a group's change must exceed to mean anything (on
    KuaiRand's 2 validation days about +-0.01 on click and long_view, more on rare heads).

    Args:
        train_df / valid_df: as :func:`train_heavy` (``valid_df`` needs ``request_id``).
        baseline: the full model's calibrated predictions ``[N_valid, H]`` (trained if None).
        log: receives one progress line per variant.

    Returns:
        DataFrame, one row per variant (``all`` first, then ``-<group>``), columns ``variant``,
        ``removed`` (features dropped), ``<head>_request_gauc`` for every head,
        ``<head>_delta`` (variant minus ``all``; negative = the group helps) and ``mean_delta``
        over heads with >= ``ABLATION_MIN_POSITIVES`` validation positives; then, when
        ``noise_seeds >= 2``, a row ``seed spread`` whose ``<head>_delta`` is the max - min of the
        full model's request GAUC over the seeds (``<head>_request_gauc``: their mean).

    Raises:
        KeyError: ``valid_df`` has no ``request_id`` column.
    """
    groups = dict(FEATURE_GROUPS if groups is None else groups)
    names = tuple(feature_names)
    requests = valid_df["request_id"].to_numpy()
    labels = {h: valid_df[h].to_numpy() for h in HEADS}
    major = [h for h in HEADS if labels[h].sum() >= ABLATION_MIN_POSITIVES]

    def scores(p: np.ndarray) -> dict[str, float]:
        return {f"{h}_request_gauc": M.gauc(labels[h], p[:, j], requests) for j, h in enumerate(HEADS)}

    if baseline is None:
        baseline = fit_heavy_ranker(train_df, params, names, HEADS).predict(valid_df)
    rows = [{"variant": "all", "removed": 0, **scores(baseline)}]
    for i, (group, feats) in enumerate(groups.items(), 1):
        kept = tuple(n for n in names if n not in set(feats))
        started = time.monotonic()
        p = fit_heavy_ranker(train_df, params, kept, HEADS).predict(valid_df)
        rows.append({"variant": f"-{group}", "removed": len(names) - len(kept), **scores(p)})
        log(f"[ablation {i}/{len(groups)}] -{group}: {len(names) - len(kept)} features removed, "
            f"{time.monotonic() - started:.0f} s")
    table = pd.DataFrame(rows)
    for h in HEADS:
        table[f"{h}_delta"] = table[f"{h}_request_gauc"] - table.loc[0, f"{h}_request_gauc"]
    table["mean_delta"] = table[[f"{h}_delta" for h in major]].mean(axis=1) if major else np.nan
    if noise_seeds >= 2:
        runs = [rows[0]]
        for k in range(1, noise_seeds):
            seeded = replace(params, seed=params.seed + k)
            runs.append(scores(fit_heavy_ranker(train_df, seeded, names, HEADS).predict(valid_df)))
            log(f"[ablation] full model, seed {seeded.seed} (training noise)")
        spread = {"variant": "seed spread", "removed": 0}
        for h in HEADS:
            values = np.array([r[f"{h}_request_gauc"] for r in runs], dtype=float)
            spread[f"{h}_request_gauc"] = float(np.nanmean(values))
            spread[f"{h}_delta"] = float(np.nanmax(values) - np.nanmin(values))
        spread["mean_delta"] = float(np.mean([spread[f"{h}_delta"] for h in major])) if major else np.nan
        table = pd.concat([table, pd.DataFrame([spread])], ignore_index=True)
    return table


def format_ablation(table: pd.DataFrame) -> str:
    """The ablation table as aligned text: request GAUC per head with its change from ``all``.

    The ``seed spread`` row shows the mean over seeds and, in place of a change, the max - min
    (``±``); a change no larger than the spread is marked ``~`` (training noise)."""
    heads = [h for h in HEADS if f"{h}_request_gauc" in table]
    noise = table.loc[table["variant"] == "seed spread"]
    spread = {h: float(noise[f"{h}_delta"].iloc[0]) for h in heads} if len(noise) else {}
    lines = [f"{'variant':<18}{'removed':>8}" + "".join(f"{h:>17}" for h in heads) + f"{'mean delta':>12}"]
    for _, row in table.iterrows():
        cells = ""
        for h in heads:
            d = row[f"{h}_delta"]
            if row["variant"] == "all":
                tail = " " * 8
            elif row["variant"] == "seed spread":
                tail = f" ±{d:.3f} "
            else:
                tail = f" {d:+.3f}" + ("~" if h in spread and abs(d) <= spread[h] else " ")
            cells += f"{row[f'{h}_request_gauc']:>9.3f}{tail}"
        lines.append(f"{row['variant']:<18}{int(row['removed']):>8}{cells}{row['mean_delta']:>+12.4f}")
    lines.append("~ : the change is within the full model's spread over seeds (training noise)")
    return "\n".join(lines)


def train_heavy(
    train_df: pd.DataFrame,
    valid_df: pd.DataFrame,
    state: StateDir,
    register: bool = True,
    set_champion: bool = True,
    params: HeavyRankerParams | None = None,
    feature_names: Sequence[str] = HEAVY_RANKER_FEATURES,
    ablation: bool = False,
    log=print,
) -> TrainResult:
    """Train, calibrate, evaluate, log and register the heavy ranker (7 heads of ``schema.HEADS``).

    Arguments and errors as :func:`train_light`; the model is registered as
    ``schema.HEAVY_RANKER_NAME``. ``ablation=True`` also runs :func:`heavy_ablation` (one more
    training per feature group) and logs its table as ``ablation.json`` in the same run
    (``TrainResult.ablation``).
    """
    import mlflow

    _require_rows(train_df, valid_df)
    params = params or HeavyRankerParams()
    fit = fit_heavy_ranker(train_df, params, feature_names, HEADS)

    p_cal = fit.predict(valid_df)
    p_raw = fit.predict_uncalibrated(valid_df)
    users = valid_df["user_id"].to_numpy()
    requests = _requests(valid_df)
    table = None
    if ablation and requests is None:
        log("ablation skipped: the validation rows carry no request ids (request GAUC needs them)")
    elif ablation:
        table = heavy_ablation(train_df, valid_df, params, fit.feature_names, baseline=p_cal, log=log)
    nested = {}
    for j, head in enumerate(HEADS):
        y = valid_df[head].to_numpy()
        nested[head] = head_metrics(y, p_cal[:, j], users, requests=requests)
        nested[head]["ece_uncalibrated"] = M.expected_calibration_error(y, p_raw[:, j])
    run_params = {
        **params.as_dict(),
        "ranker": "heavy", "n_features": len(fit.feature_names), "loss": "bce_sqrt_pos_weight",
        "architecture": "mmoe", "prior_offset_heads": ",".join(
            h for h, m in zip(fit.heads, fit.model.prior_mask.tolist()) if m) or "none",
        "epochs": fit.epochs, "best_epoch": fit.best_epoch, "calibration": "platt_per_head",
        "fit_rows": fit.fit_rows, "calibration_rows": fit.calibration_rows, "valid_rows": len(valid_df),
        "train_days": _days(train_df), "valid_days": _days(valid_df), "train_seconds": round(fit.seconds, 2),
        **{f"pos_weight_{h}": round(w, 4) for h, w in fit.pos_weight.items()},
    }
    norm_log1p = [n for n, flag in zip(fit.feature_names, fit.model.in_log1p.tolist()) if flag]
    features = {
        "feature_names": list(fit.feature_names),
        "heads": list(HEADS),
        "log1p_features": norm_log1p,
        "platt": {h: {"a": a, "b": b} for h, (a, b) in fit.platt.items()},
    }
    # trace with real rows, NaN imputed by the training medians (the JSON example cannot hold NaN)
    example = feature_matrix(train_df.head(8), fit.feature_names)
    example = np.where(np.isnan(example), fit.model.in_median.numpy(), example).astype(np.float32)

    state.ensure()
    uri = state.mlflow_tracking_uri
    with mlflow_uris(uri):
        exp_id = ensure_experiment(uri, state.mlflow_artifacts)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"heavy-{time.strftime('%Y%m%d-%H%M%S')}",
                              tags={"ranker": "heavy"}, nested=mlflow.active_run() is not None) as run:
            flat = _log_run_data(run_params, nested, features)
            if table is not None:
                mlflow.log_table(table, "ablation.json")
            info = log_heavy_model(fit.model, example, HEAVY_RANKER_NAME if register else None)
    version = _finish(state, HEAVY_RANKER_NAME, info, register, set_champion)
    return TrainResult(run.info.run_id, version, flat, fit, ablation=table)
