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

:func:`train_two_tower` is the learned-retrieval run of the same experiment (tag
``ranker=two_tower``): the two-tower model (``models.two_tower``) on the users' engagement
sequences, held-out recall@K against the 7-day popularity list, and the model with its candidate
embeddings and FAISS index registered as ``schema.TWO_TOWER_NAME``.

Input frames follow the training-set contract: user_id, post_id, author_id, event_timestamp,
date (int yyyymmdd), the label columns of ``schema.HEADS`` (0/1), and the feature columns.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from core.schema import (
    CANDIDATE_LIGHT_RANKER_FEATURES, CHAMPION_ALIAS, FEATURE_GROUPS, HEADS, HEAVY_RANKER_FEATURES, HEAVY_RANKER_NAME,
    LIGHT_RANKER_FEATURES, LIGHT_RANKER_NAME, RETRIEVAL_FEATURES,
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
        index: the two-tower's ``AnnIndex`` over the registered candidate embeddings, else None.
    """

    run_id: str
    model_version: int | None
    metrics: dict[str, float]
    model: Any = field(default=None, repr=False, compare=False)
    ablation: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    index: Any = field(default=None, repr=False, compare=False)


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


@contextmanager
def _training_run(state: StateDir, prefix: str, tags: dict[str, str]):
    """One MLflow run in the state's tracking store (experiment ``home-mixer-rankers``), named
    ``<prefix>-<time>``, nested when a run is already active; yields the run."""
    import mlflow

    state.ensure()
    uri = state.mlflow_tracking_uri
    with mlflow_uris(uri):
        exp_id = ensure_experiment(uri, state.mlflow_artifacts)
        with mlflow.start_run(experiment_id=exp_id, run_name=f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}",
                              tags=tags, nested=mlflow.active_run() is not None) as run:
            yield run


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
    continue_from: tuple[int, Any] | None = None,
) -> TrainResult:
    """Train, evaluate, log and register the light ranker (LightGBM, target ``engaged``).

    Args:
        train_df: training days (the last one is the early-stopping slice).
        valid_df: validation days (metrics only).
        state: state folder: MLflow URI and artifact location.
        register: register the model as ``schema.LIGHT_RANKER_NAME``.
        set_champion: move alias ``champion`` to the new version (needs ``register``).
        params: LightGBM settings; feature_names: input columns.
        continue_from: ``(version, booster)``: an incremental update that adds trees to that
            registered version's booster, fit on ``train_df`` alone (``fit_light_ranker``'s
            ``init_model``; logged as ``continued_from``), instead of training from scratch.

    Raises:
        ValueError: empty frames or fewer than 2 training days.
        KeyError / MissingFeaturesError: label or feature columns missing.
    """
    _require_rows(train_df, valid_df)
    params = params or LightRankerParams()
    started = time.monotonic()
    fit = fit_light_ranker(train_df, params, feature_names,
                           init_model=continue_from[1] if continue_from is not None else None)
    seconds = time.monotonic() - started

    run_params = {
        **params.as_dict(),
        "continued_from": continue_from[0] if continue_from is not None else "",
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
    p = fit.predict(valid_df)[:, 0]
    users = valid_df["user_id"].to_numpy()
    requests = _requests(valid_df)
    nested = {"engaged": head_metrics(engaged_label(valid_df), p, users, requests=requests)}
    for head in HEADS:  # how well the single score ranks each engagement
        nested[head] = head_metrics(valid_df[head].to_numpy(), p, users, calibration=False, requests=requests)
    nested |= extra
    features = {"feature_names": list(fit.feature_names), "heads": list(LIGHT_HEADS)}

    with _training_run(state, "light", {"ranker": "light", "objective": run_params.get("objective", "")}) as run:
        flat = _log_run_data(run_params, nested, features)
        info = log_light_model(fit.booster, fit.feature_names, LIGHT_HEADS, LIGHT_RANKER_NAME if register else None)
    version = _finish(state, LIGHT_RANKER_NAME, info, register, set_champion)
    return TrainResult(run.info.run_id, version, flat, fit)


# Users of the candidate sets kept out of fitting and early stopping, for the run's candidate metrics.
REPORT_USER_SHARE = 0.1


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
        valid_df: validation impressions (the same metrics as :func:`train_light`, with the retrieval
            scores missing as logged requests have them); a ``REPORT_USER_SHARE`` of the users,
            neither fitted nor early-stopped on, add ``valid_candidates_engaged_auc`` / ``_gauc``
            (per user; the sampled rows unweighted).
        context: extra run params (cutoff, label days, users...).

    Raises:
        ValueError / KeyError: see ``models.light_ranker.fit_light_ranker_on_candidates``; empty frames.
    """
    from models.light_ranker import fit_light_ranker_on_candidates, user_holdout

    _require_rows(candidates, valid_df)
    # logged impressions have no retrieval model as of their time: missing, as serving would have it
    valid_df = valid_df.assign(**{c: np.nan for c in RETRIEVAL_FEATURES if c not in valid_df.columns})
    params = params or LightRankerParams(min_data_in_leaf=50)
    # the reported users are neither fitted nor early-stopped on
    report = user_holdout(candidates["user_id"].to_numpy(), REPORT_USER_SHARE, params.seed + 1)
    started = time.monotonic()
    fit = fit_light_ranker_on_candidates(candidates.loc[~report], params, feature_names)
    seconds = time.monotonic() - started
    rows = candidates.loc[report]
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
    ``sequence_attention`` group (the sequence columns, read only by DIN attention) is the
    exception while ``params.sequence_attention`` is off: its variant ``+sequence_attention``
    trains with attention on instead (a change of the model, not of its inputs). The
    full model is also retrained with ``noise_seeds - 1`` other seeds: the spread of its request
    GAUC over seeds is the training noise a group's change must exceed to mean anything (on
    KuaiRand's 2 validation days about +-0.01 on click and long_view, more on rare heads).

    Args:
        train_df / valid_df: as :func:`train_heavy` (``valid_df`` needs ``request_id``).
        baseline: the full model's calibrated predictions ``[N_valid, H]`` (trained if None).
        log: receives one progress line per variant.

    Returns:
        DataFrame, one row per variant (``all`` first, then ``-<group>`` / ``+sequence_attention``), columns ``variant``,
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
        if group == "sequence_attention" and not params.sequence_attention:
            # the sequence columns are inputs only through attention: with it off, compare turning it on
            p = fit_heavy_ranker(train_df, replace(params, sequence_attention=True), names, HEADS).predict(valid_df)
            rows.append({"variant": f"+{group}", "removed": 0, **scores(p)})
            log(f"[ablation {i}/{len(groups)}] +{group}: {time.monotonic() - started:.0f} s")
            continue
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

    with _training_run(state, "heavy", {"ranker": "heavy"}) as run:
        flat = _log_run_data(run_params, nested, features)
        if table is not None:
            mlflow.log_table(table, "ablation.json")
        info = log_heavy_model(fit.model, example, HEAVY_RANKER_NAME if register else None)
    version = _finish(state, HEAVY_RANKER_NAME, info, register, set_champion)
    return TrainResult(run.info.run_id, version, flat, fit, ablation=table)


# ---------------------------------------------------------------- learned retrieval (two-tower)

# recall@K of the held-out check: the candidate source's retrieval depths
TWO_TOWER_KS: tuple[int, ...] = (50, 100, 200)
# the popularity baseline: posts by engagements in the 7 days before the held-out day (the
# whole-funnel evaluation's 7-day popularity list)
POPULAR_WINDOW_DAYS = 7


def servable_posts(posts: pd.DataFrame, before: pd.Timestamp) -> pd.DataFrame:
    """Posts created before ``before`` (undated ones are not servable), one row per post (the
    newest row of a post listed twice): the catalogue an ANN index built at ``before`` holds."""
    created = pd.to_datetime(posts["created_ts"], utc=True)
    return posts.loc[created.notna() & (created < before)].drop_duplicates("post_id", keep="last")


def train_two_tower(
    state: StateDir,
    as_of=None,
    params=None,
    register: bool = True,
    set_champion: bool = True,
    index_kind: str = "hnsw",
    index_params: dict | None = None,
    refit: bool = True,
    log=print,
) -> TrainResult:
    """Train, evaluate, log and register the two-tower retrieval model with its FAISS index.

    Steps, all point in time (nothing at or after ``as_of`` is read):
    1. the state's canonical ``impressions``, ``posts`` and (if present) ``prelog_events``;
       ``engagement_sequences`` before ``as_of`` (default: the start of the validation days,
       ``models.two_tower.validation_cutoff(impressions, schema.VALIDATION_DAYS)``, the rule of
       the whole-funnel evaluation, so its evaluated days stay unseen);
    2. held-out check: the model is trained on the events before the last day before ``as_of``
       (its first impression) and measured on that day: ``holdout_recall_at_K`` (next-engaged
       posts in the user vector's top K from the index over the posts created before that day,
       history removed: ``two_tower.next_engagement_recall``), ``holdout_popular_recall_at_K``
       (the 7-day popularity list, same users), ``holdout_exact_recall_at_K`` (exact search) and
       ``index_recall_at_100`` (ANN top 100 against exact, the same queries);
    3. ``refit=True``: trained again on every event before ``as_of`` (the registered model);
       ``False`` registers the held-out model itself (cheaper, one day less data);
    4. candidate embeddings of every post created before ``as_of``, the ANN index over them;
    5. one MLflow run (experiment ``home-mixer-rankers``, tag ``ranker=two_tower``): params
       (``TwoTowerParams``, counts, cutoffs, index settings), metrics, ``two_tower.json``, the model
       with embeddings and index (``models.registry.log_two_tower_model``), registered as
       ``schema.TWO_TOWER_NAME``; alias ``champion`` moved unless ``set_champion=False``.

    Args:
        state: state folder with the canonical tables (``home-mixer features build``).
        as_of: training cutoff (tz-aware, or naive UTC); None: the validation days' start.
        params: ``models.two_tower.TwoTowerParams`` (default settings if None).
        index_kind / index_params: ``AnnIndex.build`` kind and parameters.
        log: progress lines.

    Returns:
        :class:`TrainResult` (``model``: the registered ``TwoTowerFit``; ``metrics`` as logged).

    Raises:
        FileNotFoundError: a canonical table is missing.
        ValueError: no training examples, too few dates to find the held-out day, or a bad index setting.
    """
    import mlflow

    from models.ann_index import AnnIndex, exact_recall_at_k
    from models.registry import log_two_tower_model
    from models.two_tower import (
        ITEM_COLUMNS, TwoTowerParams, fit_two_tower, latest_histories, next_engagement_recall, validation_cutoff,
    )
    from core.schema import TWO_TOWER_NAME, VALIDATION_DAYS
    from pipelines.sequences import engagement_sequences

    params = (params or TwoTowerParams()).validate()
    tables = {}
    for name in ("impressions", "posts"):
        if not state.table(name).exists():
            raise FileNotFoundError(f"canonical table {state.table(name)} is missing: run `home-mixer features build` first")
        tables[name] = pd.read_parquet(state.table(name))
    imp, posts = tables["impressions"], tables["posts"]
    prelog = pd.read_parquet(state.table("prelog_events")) if state.table("prelog_events").exists() else None
    if as_of is None:
        _, cutoff = validation_cutoff(imp, VALIDATION_DAYS)
    else:
        cutoff = pd.Timestamp(as_of)
        cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    earlier = imp[pd.to_datetime(imp["event_ts"], utc=True) < cutoff]
    if earlier["date"].nunique() < 2:
        raise ValueError(f"the held-out check needs >= 2 dates before {cutoff}, the log has "
                         f"{sorted(earlier['date'].unique().tolist())}: give a later as_of")
    (holdout_day,), holdout_start = validation_cutoff(earlier, 1)
    started = time.monotonic()
    sequences = engagement_sequences(imp, prelog, cutoff)
    log(f"[two-tower] {len(sequences):,} engagements of {sequences['user_id'].nunique():,} users before {cutoff}; "
        f"held-out day {holdout_day} from {holdout_start}")

    # held-out check
    held = fit_two_tower(sequences, posts, params, before=holdout_start, log=log)
    catalogue = servable_posts(posts, holdout_start)
    ids, vectors = held.item_embeddings(catalogue[list(ITEM_COLUMNS)])
    index = AnnIndex.build(ids, vectors, index_kind, **(index_params or {}))
    exact = AnnIndex.build(ids, vectors, "flat")
    ts = sequences["ts"].to_numpy(dtype="float64")
    window = (ts >= (holdout_start - pd.Timedelta(days=POPULAR_WINDOW_DAYS)).value / 1e9) & (ts < holdout_start.value / 1e9)
    popular = sequences.loc[window, "post_id"].value_counts()
    popular = popular[popular.index.isin(set(ids.tolist()))].index.to_numpy(dtype="int64")
    ann = next_engagement_recall(held, index.search, sequences, holdout_start, cutoff, TWO_TOWER_KS, popular)
    ex = next_engagement_recall(held, exact.search, sequences, holdout_start, cutoff, TWO_TOWER_KS)
    histories = latest_histories(sequences, holdout_start, params.max_sequence_length)
    queries = held.user_embeddings(list(histories.values())[:2000])
    index_recall = exact_recall_at_k(index.search(queries, 100)[0], exact.search(queries, 100)[0], 100)
    metrics = {f"holdout_{k}": float(v) for k, v in ann.items() if k not in ("users", "cold_users")}
    metrics.update({f"holdout_exact_{k}": float(v) for k, v in ex.items() if k.startswith("recall")})
    metrics.update({"index_recall_at_100": index_recall, "holdout_users": ann["users"],
                    "holdout_cold_users": ann["cold_users"], "holdout_train_seconds": held.stats["seconds"]})
    log(f"[two-tower] held-out day {holdout_day}: recall@100 {metrics['holdout_recall_at_100']:.3f} "
        f"(popularity {metrics.get('holdout_popular_recall_at_100', float('nan')):.3f}, exact search "
        f"{metrics['holdout_exact_recall_at_100']:.3f}), index recall@100 vs exact {index_recall:.3f}, "
        f"{int(ann['users']):,} users")

    fit = fit_two_tower(sequences, posts, params, log=log) if refit else held
    catalogue = servable_posts(posts, cutoff)
    ids, vectors = fit.item_embeddings(catalogue[list(ITEM_COLUMNS)])
    index = AnnIndex.build(ids, vectors, index_kind, **(index_params or {}))
    metrics.update({"train_seconds": fit.stats["seconds"], "final_loss": fit.stats["epoch_losses"][-1],
                    "index_build_seconds": index.build_seconds, "index_bytes": float(index.memory_bytes()),
                    "catalogue": float(len(ids))})
    run_params = {
        **params.as_dict(), "ranker": "two_tower", "loss": "in_batch_softmax_logq", "as_of": cutoff.isoformat(),
        "holdout_day": holdout_day, "holdout_start": holdout_start.isoformat(), "refit": refit,
        "examples": fit.stats["examples"], "users": fit.stats["users"], "vocab_posts": fit.stats["vocab_posts"],
        "vocab_authors": fit.stats["vocab_authors"], "vocab_tags": fit.stats["vocab_tags"],
        "index_kind": index.kind, **{f"index_{k}": v for k, v in index.params.items()},
        "prelog_history": prelog is not None,
    }

    with _training_run(state, "two-tower", {"ranker": "two_tower"}) as run:
        mlflow.log_params(run_params)
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        mlflow.log_dict({"metrics": {k: (v if math.isfinite(v) else None) for k, v in metrics.items()},
                         "stats": fit.stats, "held_out_stats": held.stats}, "two_tower.json")
        info = log_two_tower_model(fit, ids, vectors, index, TWO_TOWER_NAME if register else None)
    version = _finish(state, TWO_TOWER_NAME, info, register, set_champion)
    log(f"[two-tower] run {run.info.run_id}, version {version}, {time.monotonic() - started:.0f} s")
    return TrainResult(run.info.run_id, version, metrics, fit, index=index)


def refresh_two_tower_index(state: StateDir, as_of=None, index_kind: str = "hnsw", index_params: dict | None = None,
                            register: bool = True, set_champion: bool = True, query_users: int = 2000,
                            log=print) -> TrainResult:
    """Rebuild the served two-tower's candidate embeddings and ANN index over today's catalogue,
    without retraining the towers: the index job of ``home-mixer index build``.

    Posts keep arriving after the two-tower was trained; the candidate tower embeds a new post from
    its author, tag and content (id dropout trained it for unseen ids), so the catalogue can be
    refreshed as often as the candidate index while the towers are retrained on their own cadence
    (YouTube's and Pinterest's retrieval indexes are rebuilt this way, daily or faster).

    Steps: the champion ``two_tower`` version's towers; every post created before ``as_of``
    (:func:`servable_posts`) embedded by the candidate tower; the index (``AnnIndex.build``) and
    its recall@100 against exact search for up to ``query_users`` real user vectors (the users'
    latest sequences before ``as_of``); logged as an MLflow run (``home-mixer-rankers``; params
    ``source_version``, ``as_of``, the index settings; metrics ``catalogue``, ``new_posts`` (not in
    the source version's catalogue), ``index_recall_at_100``, ``index_build_seconds``,
    ``index_bytes``) and registered as a new ``two_tower`` version with the same towers, moved to
    ``champion`` when ``set_champion`` (the mixer's alias watcher swaps it in without a restart).

    Args:
        state: the state folder (canonical tables, MLflow).
        as_of: catalogue cutoff (default: the hour after the log's last impression, "now").
        index_kind / index_params: as :func:`train_two_tower`.
        register / set_champion: as the other trainers.
        query_users: users whose vectors measure the index's recall (0: skip the check).

    Returns:
        :class:`TrainResult` (``model``: the unchanged ``TwoTowerFit``; ``index``: the new index).

    Raises:
        models.registry.RankerNotFoundError: no ``two_tower`` champion (run
            ``home-mixer train --model two_tower`` first).
        FileNotFoundError: the canonical tables are missing.
        ValueError: no post was created before ``as_of``.
    """
    import mlflow

    from core.schema import TWO_TOWER_NAME
    from models.ann_index import AnnIndex, exact_recall_at_k
    from models.registry import load_two_tower, log_two_tower_model
    from models.two_tower import ITEM_COLUMNS, latest_histories
    from pipelines.sequences import engagement_sequences
    from pipelines.training_set import log_end

    champion = load_two_tower(state.mlflow_tracking_uri)
    for name in ("impressions", "posts"):
        if not state.table(name).exists():
            raise FileNotFoundError(f"canonical table {state.table(name)} is missing: run `home-mixer features build` first")
    cutoff = pd.Timestamp(log_end(state) if as_of is None else as_of)
    cutoff = cutoff.tz_localize("UTC") if cutoff.tzinfo is None else cutoff.tz_convert("UTC")
    started = time.monotonic()
    catalogue = servable_posts(pd.read_parquet(state.table("posts")), cutoff)
    if catalogue.empty:
        raise ValueError(f"no post was created before {cutoff}: nothing to index")
    fit = champion.model
    ids, vectors = fit.item_embeddings(catalogue[list(ITEM_COLUMNS)])
    index = AnnIndex.build(ids, vectors, index_kind, **(index_params or {}))
    new_posts = int((~np.isin(ids, np.asarray(champion.item_ids, dtype=np.int64))).sum())
    metrics = {"catalogue": float(len(ids)), "new_posts": float(new_posts),
               "index_build_seconds": index.build_seconds, "index_bytes": float(index.memory_bytes())}
    if query_users > 0:
        imp = pd.read_parquet(state.table("impressions"))
        prelog = pd.read_parquet(state.table("prelog_events")) if state.table("prelog_events").exists() else None
        histories = latest_histories(engagement_sequences(imp, prelog, cutoff), cutoff, fit.params.max_sequence_length)
        if histories:
            queries = fit.user_embeddings(list(histories.values())[:query_users])
            exact = AnnIndex.build(ids, vectors, "flat")
            metrics["index_recall_at_100"] = exact_recall_at_k(index.search(queries, 100)[0],
                                                               exact.search(queries, 100)[0], 100)
    with _training_run(state, "two-tower-index", {"ranker": "two_tower", "job": "index_build"}) as run:
        mlflow.log_params({"source_version": champion.version, "as_of": cutoff.isoformat(), "index_kind": index.kind,
                           **{f"index_{k}": v for k, v in index.params.items()}})
        mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
        info = log_two_tower_model(fit, ids, vectors, index, TWO_TOWER_NAME if register else None)
    version = _finish(state, TWO_TOWER_NAME, info, register, set_champion)
    log(f"[two-tower index] towers of v{champion.version}, {len(ids):,} posts before {cutoff} ({new_posts:,} new), "
        f"{index.kind} in {index.build_seconds:.1f} s"
        + (f", recall@100 vs exact {metrics['index_recall_at_100']:.3f}" if "index_recall_at_100" in metrics else "")
        + (f" -> version {version}" if version is not None else ""))
    return TrainResult(run.info.run_id, version, metrics, fit, index=index)
