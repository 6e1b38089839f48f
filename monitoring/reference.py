"""Reference profiles: what a model saw in training, stored with the model version in MLflow.

Drift is measured against the reference of the champion being served, so the reference travels
with the model: when a version is trained, a seeded sample of its training window (every model
input feature, every head's score and label, the surface) and a summary of it are logged as
artifacts of the run that registered the version (``reference/sample.parquet`` and
``reference/profile.json``). ``load_reference`` follows alias -> version -> run -> artifacts.

The profile summarises, per feature (grouped by feature view): null share, mean, standard
deviation and quantiles; per head: score mean and quantiles and the label rate; and the surface
mix. A log-trained model has no candidate sources (every row was an impression), so the source mix
is recorded as ``{"log": 1.0}``; production samples carry the real mix.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.schema import (
    CHAMPION_ALIAS, FEATURE_VIEWS, HEADS, HEAVY_RANKER_FEATURES, HEAVY_RANKER_NAME, ID_FEATURES,
    HISTORY_FEATURES, LIGHT_RANKER_FEATURES, REQUEST_FEATURES, RETRIEVAL_FEATURES, SEQUENCE_ID_FEATURES,
)

REFERENCE_DIR = "reference"
SAMPLE_FILE = "sample.parquet"
PROFILE_FILE = "profile.json"
# rows kept in the reference sample: enough for every drift test to reach its large-sample method
# (Evidently switches from K-S to Wasserstein distance above 1,000 rows) and small as an artifact
DEFAULT_SAMPLE_ROWS = 20_000
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def score_column(head: str) -> str:
    """Column of the heavy ranker's probability for ``head`` in samples and profiles."""
    return f"score_{head}"


def monitored_features() -> tuple[str, ...]:
    """Model input features watched for drift: the inputs of both rankers, without id buckets, the candidate's or
    the sequence's (a hash has no distribution to compare)."""
    names = dict.fromkeys((*HEAVY_RANKER_FEATURES, *LIGHT_RANKER_FEATURES))
    return tuple(n for n in names if n not in ID_FEATURES and n not in SEQUENCE_ID_FEATURES)


def feature_view_of(feature: str) -> str:
    """The feature view a feature belongs to (``request`` for request-time features, ``history``
    for the user-action-sequence features, ``retrieval`` for the retrieval models' scores)."""
    for view in FEATURE_VIEWS:
        if feature in view.features:
            return view.name
    if feature in REQUEST_FEATURES:
        return "request"
    if feature in HISTORY_FEATURES or feature in SEQUENCE_ID_FEATURES:
        return "history"
    if feature in RETRIEVAL_FEATURES:
        return "retrieval"
    raise KeyError(f"{feature!r} is not a feature of core.schema")


@dataclass(frozen=True)
class ReferenceProfile:
    """A reference: the sample and its summary.

    Attributes:
        sample: DataFrame of up to ``DEFAULT_SAMPLE_ROWS`` rows: ``monitored_features()`` (float64),
            ``score_<head>`` (float64 probabilities), the ``HEADS`` labels (int64 0/1, when the
            frame had them), ``tab``, ``date`` and ``request_ts`` (when the frame had it).
        profile: JSON-ready summary (see the module docstring).
    """

    sample: pd.DataFrame
    profile: dict


def build_reference(frame: pd.DataFrame, predict, heads=HEADS, max_rows: int = DEFAULT_SAMPLE_ROWS,
                    seed: int = 0, description: str = "") -> ReferenceProfile:
    """Profile a training window.

    Args:
        frame: training-set rows (``pipelines.training_set``): the monitored features, labels,
            ``tab``, ``date``.
        predict: ``rows -> float [len(rows), H]``, the heavy ranker's calibrated probabilities in
            ``heads`` order; called on the sampled rows only (scoring the whole window would be
            wasted on rows the sample drops).
        max_rows: sample size (rows drawn uniformly without replacement, seeded).
        description: free text kept in the profile (e.g. "training days 20220425..20220502").

    Raises:
        ValueError: ``predict`` does not return one row per sampled row and one column per head, or
            the frame is empty.
        KeyError: monitored feature columns are missing (names them).
    """
    heads = tuple(heads)
    if len(frame) == 0:
        raise ValueError("cannot profile an empty training window")
    features = monitored_features()
    missing = [f for f in features if f not in frame.columns]
    if missing:
        raise KeyError(f"the frame lacks monitored feature columns {missing}")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(frame), size=min(max_rows, len(frame)), replace=False))
    rows = frame.iloc[idx]
    scores = np.asarray(predict(rows), dtype=np.float64)
    if scores.shape != (len(idx), len(heads)):
        raise ValueError(f"scores of shape {scores.shape} do not match {len(idx)} rows x {len(heads)} heads")
    sample = rows[list(features)].apply(pd.to_numeric, errors="coerce").astype("float64")
    for j, h in enumerate(heads):
        sample[score_column(h)] = scores[:, j]
    for h in heads:
        if h in frame.columns:
            sample[h] = frame[h].to_numpy()[idx].astype("int64")
    # the request time lets the drift job put growing features in their declared forms
    for col in ("tab", "date", "request_ts"):
        if col in frame.columns:
            sample[col] = frame[col].to_numpy()[idx]
    sample = sample.reset_index(drop=True)
    return ReferenceProfile(sample=sample, profile=summarise(sample, heads, description))


def summarise(sample: pd.DataFrame, heads=HEADS, description: str = "") -> dict:
    """The JSON summary of a sample (features by view, scores and label rates per head, surfaces)."""
    def stats(values: pd.Series) -> dict:
        v = values.to_numpy(dtype="float64")
        ok = v[np.isfinite(v)]
        out = {"null_share": float(1 - len(ok) / len(v)) if len(v) else 0.0}
        if len(ok):
            out |= {"mean": float(ok.mean()), "std": float(ok.std()),
                    "quantiles": dict(zip(map(str, QUANTILES), map(float, np.quantile(ok, QUANTILES))))}
        return out

    by_view: dict[str, dict] = {}
    for f in monitored_features():
        if f in sample.columns:
            by_view.setdefault(feature_view_of(f), {})[f] = stats(sample[f])
    heads_out = {}
    for h in heads:
        entry = stats(sample[score_column(h)]) if score_column(h) in sample.columns else {}
        if h in sample.columns:
            entry["label_rate"] = float(sample[h].mean())
        heads_out[h] = entry
    surfaces = (sample["tab"].value_counts(normalize=True).sort_index() if "tab" in sample.columns
                else pd.Series(dtype=float))
    return {
        "description": description,
        "rows": int(len(sample)),
        "features": by_view,
        "heads": heads_out,
        "surface_mix": {str(int(k)): float(v) for k, v in surfaces.items()},
        "source_mix": {"log": 1.0},
    }


def log_reference(reference: ReferenceProfile, run_id: str, tracking_uri: str) -> None:
    """Log the sample and the profile as artifacts ``reference/…`` of the MLflow run ``run_id``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / REFERENCE_DIR
        folder.mkdir()
        reference.sample.to_parquet(folder / SAMPLE_FILE, index=False)
        (folder / PROFILE_FILE).write_text(json.dumps(reference.profile, indent=2))
        client.log_artifacts(run_id, str(folder), REFERENCE_DIR)


class ReferenceNotFoundError(LookupError):
    """The model version has no reference profile (trained before profiles existed): retrain it."""


def load_reference(tracking_uri: str, name: str = HEAVY_RANKER_NAME, alias: str = CHAMPION_ALIAS,
                   version: int | None = None) -> tuple[ReferenceProfile, int]:
    """The reference of ``name@alias`` (or of ``version``) and the version it belongs to.

    Raises:
        models.registry.RankerNotFoundError: no such model, alias or version.
        ReferenceNotFoundError: the version's run has no ``reference/`` artifacts.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from models.registry import alias_version, registered_version

    version = int(version) if version is not None else alias_version(name, alias, tracking_uri)
    run_id = registered_version(name, version, tracking_uri).run_id
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(client.download_artifacts(run_id, REFERENCE_DIR, tmp))
        except (MlflowException, OSError) as exc:
            raise ReferenceNotFoundError(
                f"{name} version {version} (run {run_id}) has no reference profile; it was trained before "
                "profiles existed: retrain it (`home-mixer train`)") from exc
        if not (local / SAMPLE_FILE).exists():
            raise ReferenceNotFoundError(f"{name} version {version} (run {run_id}) has no {REFERENCE_DIR}/{SAMPLE_FILE}")
        sample = pd.read_parquet(local / SAMPLE_FILE)
        profile = json.loads((local / PROFILE_FILE).read_text())
    return ReferenceProfile(sample=sample, profile=profile), version
