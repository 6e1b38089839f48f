"""``home-mixer evaluate``: score the registered champions on any impression log of the KuaiRand schema.

Features for the evaluated rows are rebuilt point-in-time from the history log plus the evaluated
log (the same Spark jobs and Feast point-in-time join as training), in a separate state folder so
the served feature store is untouched.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from feature_repo import store as fs
from home_mixer import jobs
from core.requests import REQUEST_GAP_S
from core.state import DEFAULT_DATA_DIR, StateDir

SHARED_LOG = DEFAULT_DATA_DIR / "log_standard_20220425_20220504.csv"


def control_weights() -> dict[str, float]:
    """Blend weights of the first (control) arm of the embedded mixer config."""
    from mixer.config import load_config

    return dict(load_config(None).experiment.arms[0].weights)


def featurize_log(state: StateDir, log: Path, data_dir: Path, history: Path | None,
                  from_date: int | None, gap_s: float = REQUEST_GAP_S) -> pd.DataFrame:
    """Features as served and labels for every row of ``log`` (dated ``>= from_date``).

    Args:
        state: the main state folder; work happens in ``state/eval/<hash>``.
        log: impression log CSV to evaluate.
        history: log whose events precede ``log`` (feature history); default the shared log.
            Rows present in both are counted once.

        gap_s: request inactivity gap (seconds) that groups impressions into requests.

    Returns:
        A training-set-shaped frame (``pipelines.training_set.served_feature_rows``: requests,
        features frozen at the last materialisation before each request) of ``log``'s rows.
    """
    from pyspark.sql import functions as F

    from pipelines.features.common import PRIORS_REPORT, RatePriors
    from pipelines.spark import spark_session
    from pipelines.training_set import served_feature_rows

    log = log.resolve()
    if not log.exists():
        raise FileNotFoundError(f"impression log {log} does not exist")
    history = (history or SHARED_LOG).resolve()
    logs = [history] if history == log else [history, log]
    key = hashlib.sha256("|".join(map(str, logs)).encode()).hexdigest()[:10]
    ev_state = StateDir(state.root / "eval" / key).ensure()
    jobs.prepare_data(ev_state, data_dir, log_paths=logs)
    spark = spark_session("home-mixer-evaluate")
    priors_path = state.reports / PRIORS_REPORT
    if not priors_path.exists():
        raise FileNotFoundError(f"{priors_path} does not exist: build the training features first "
                                "(`home-mixer features build` or `home-mixer demo`)")
    jobs.build_features(spark, ev_state, priors=RatePriors.read_json(priors_path))
    # Registry in the eval state; the online store is never written here.
    store = fs.open_store(ev_state, "127.0.0.1:0")
    fs.apply(store, ev_state.tables)

    raw = pd.read_csv(log, usecols=["user_id", "video_id", "time_ms", "date"])
    if from_date is not None:
        raw = raw[raw["date"] >= from_date]
    if raw.empty:
        raise ValueError(f"{log} has no rows with date >= {from_date}")
    keys = spark.createDataFrame(
        raw.rename(columns={"video_id": "post_id"})[["user_id", "post_id", "time_ms"]].drop_duplicates()
    )
    imp = spark.read.parquet(str(ev_state.table("impressions")))
    imp = imp.withColumn("time_ms", (F.unix_micros("event_ts") / 1000).cast("long"))
    evaluated = imp.join(keys, ["user_id", "post_id", "time_ms"], "inner")
    return served_feature_rows(spark, store, evaluated, gap_s)


def evaluate_log(state: StateDir, log: Path, data_dir: Path = DEFAULT_DATA_DIR,
                 history: Path | None = None, from_date: int | None = None,
                 out: Path | None = None, gap_s: float = REQUEST_GAP_S):
    """Evaluate the ``champion`` light and heavy rankers on ``log`` as served; writes a JSON report.

    Args:
        gap_s: request inactivity gap in seconds (``core.requests``).

    Returns:
        ``models.evaluate.EvaluationReport`` (per head and scorer AUC, request GAUC with its
        interval, user GAUC; NDCG@10 per request against chronological, popularity, light).
    """
    from models.evaluate import evaluate_rankers

    df = featurize_log(state, log, data_dir, history, from_date, gap_s)
    report = evaluate_rankers(df, control_weights(), tracking_uri=state.mlflow_tracking_uri, request_gap_s=gap_s)
    report.to_json(out or state.reports / "evaluation.json")
    return report
