"""``home-mixer evaluate``: score the registered champions on any impression log of the KuaiRand schema.

Features for the evaluated rows are rebuilt point-in-time from the history log plus the evaluated
log (the same Spark jobs and Feast point-in-time join as training), in a separate state folder so
the served feature store is untouched.
"""

from __future__ import annotations

import dataclasses
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


def control_blender(heads, arm: str = "funnel"):
    """The embedded config's control arm as a ``WeightedSumBlender`` of one arm named ``arm``
    (weights and light score exponent), for offline orders that must blend as serving does."""
    from mixer.blenders import WeightedSumBlender
    from mixer.config import load_config

    control = load_config(None).experiment.arms[0]
    return WeightedSumBlender({arm: dict(control.weights)}, heads, {arm: control.light_score_exponent})


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
    posts = pd.read_parquet(ev_state.table("posts"), columns=["post_id", "primary_tag"])
    return served_feature_rows(spark, store, evaluated, posts, gap_s, history_state=ev_state)


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


# ------------------------------------------------------------------ funnel recall of the light ranker

FUNNEL_REPORT = "funnel_recall.json"


def validation_users(state: StateDir, n: int, seed: int = 0, valid_days: int | None = None) -> list[int]:
    """``n`` distinct user ids with impressions on the validation days (the last ``valid_days``
    dates of the state's impressions table, default ``core.schema.VALIDATION_DAYS``), drawn
    uniformly without replacement with ``numpy.random.default_rng(seed)``, returned sorted.

    All of them when fewer than ``n`` users had an impression on those days.

    Raises:
        FileNotFoundError: the state has no impressions table (``home-mixer demo`` / ``features build``).
        ValueError: ``n < 1`` or the table is empty.
    """
    import numpy as np

    from core.schema import VALIDATION_DAYS

    if n < 1:
        raise ValueError(f"the number of users must be >= 1, got {n}")
    path = state.table("impressions")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: build the canonical tables first (`home-mixer demo`)")
    imp = pd.read_parquet(path, columns=["user_id", "date"])
    if imp.empty:
        raise ValueError(f"{path} has no impressions")
    days = np.sort(imp["date"].unique())
    first = days[-min(valid_days or VALIDATION_DAYS, len(days))]
    users = np.sort(imp.loc[imp["date"] >= first, "user_id"].unique())
    rng = np.random.default_rng(seed)
    chosen = users if len(users) <= n else rng.choice(users, size=n, replace=False)
    return sorted(int(u) for u in chosen)


class FunnelReport:
    """Recall of the light ranker's cut: how many of the heavy ranker's top posts survive it.

    Attributes:
        light_k, heavy_k: the light ranker keeps its top ``light_k``; the heavy ranker's top
            ``heavy_k`` by blended score is what it should keep.
        users: users asked for (one request each).
        requests: requests with at least one candidate (the others are counted in ``empty``).
        empty: requests whose candidate set was empty after the filters (not in the means).
        small: requests with ``<= light_k`` candidates: the light ranker drops nothing, recall 1
            (included in ``recall``; ``recall_large`` leaves them out).
        recall: mean over ``requests`` of ``|heavy top heavy_k ∩ light top light_k| / min(heavy_k, n)``.
        recall_large: the same mean over the requests with more than ``light_k`` candidates (None
            when there are none): the requests where the cut can lose something.
        random_recall: the same mean with the light ranker replaced by a random order (seeded):
            the floor a useless light ranker reaches with the same sizes (~ light_k / n per request).
        expected_random_recall: its expectation, mean of ``min(1, light_k / n)``.
        mean_candidates, median_candidates, max_candidates: candidates per request after the
            mixer's filters (the light ranker's input), over ``requests``.
        model_versions: {"light_ranker": v, "heavy_ranker": v} measured.
        weights: the blend weights of the heavy heads (control arm).
        degraded: stage -> requests where it failed open (e.g. "realtime_features" when no stream
            processor is live: batch counts served, as the mixer does).
        source_failures: "<source>:<timeout|error>" -> requests where that candidate source gave nothing.
        per_request: DataFrame, one row per user: user_id, candidates, recall, random_recall
            (NaN for empty requests), degraded (the failed-open stages, comma-separated),
            source_failures (``<source>:<status>``, comma-separated).
    """

    def __init__(self, *, light_k: int, heavy_k: int, per_request: pd.DataFrame, model_versions: dict[str, str],
                 weights: dict[str, float], as_of: str):
        import numpy as np

        self.light_k, self.heavy_k = int(light_k), int(heavy_k)
        self.per_request = per_request
        self.model_versions = dict(model_versions)
        self.weights = dict(weights)
        self.as_of = as_of
        scored = per_request[per_request["candidates"] > 0]
        n = scored["candidates"].to_numpy(dtype="float64")
        self.users = int(len(per_request))
        self.requests = int(len(scored))
        self.empty = self.users - self.requests
        self.small = int((n <= self.light_k).sum())
        large = scored[scored["candidates"] > self.light_k]

        def mean(s) -> float | None:
            return float(s.mean()) if len(s) else None

        self.recall = mean(scored["recall"])
        self.recall_large = mean(large["recall"])
        self.random_recall = mean(scored["random_recall"])
        self.expected_random_recall = mean(pd.Series(np.minimum(1.0, self.light_k / n))) if len(n) else None
        self.mean_candidates = float(n.mean()) if len(n) else 0.0
        self.median_candidates = float(np.median(n)) if len(n) else 0.0
        self.max_candidates = int(n.max()) if len(n) else 0
        stages = [s for d in per_request["degraded"] for s in str(d).split(",") if s]
        self.degraded = {s: stages.count(s) for s in sorted(set(stages))}
        failures = [s for d in per_request["source_failures"] for s in str(d).split(",") if s]
        self.source_failures = {s: failures.count(s) for s in sorted(set(failures))}

    def to_dict(self) -> dict:
        """The summary as JSON-ready values (``per_request`` left out)."""
        keys = ("light_k", "heavy_k", "users", "requests", "empty", "small", "recall", "recall_large",
                "random_recall", "expected_random_recall", "mean_candidates", "median_candidates",
                "max_candidates", "degraded", "source_failures", "model_versions", "weights", "as_of")
        return {k: getattr(self, k) for k in keys}

    def to_json(self, path: Path) -> Path:
        """Write ``to_dict()`` to ``path`` (parents created)."""
        import json

        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_line(self) -> str:
        """One line: recall@light_k of the heavy top heavy_k, the random floor, the sizes."""
        def f(x):
            return "n/a" if x is None else f"{x:.3f}"

        return (f"funnel recall@{self.light_k} of the heavy ranker's top {self.heavy_k}: {f(self.recall)} "
                f"(random light order {f(self.random_recall)}; requests with > {self.light_k} candidates "
                f"{f(self.recall_large)} over {self.requests - self.small}) on {self.requests} requests, "
                f"{self.mean_candidates:.0f} candidates per request (median {self.median_candidates:.0f}, "
                f"max {self.max_candidates}); {self.small} with <= {self.light_k} candidates count as 1, "
                f"{self.empty} empty"
                + "".join(f"; {stage} failed open in {k}" for stage, k in self.degraded.items())
                + "".join(f"; source {src} in {k}" for src, k in self.source_failures.items()))

    def __repr__(self) -> str:
        return f"FunnelReport({self.to_dict()})"


def top_indices(scores, k: int):
    """Indices of the ``k`` highest scores, NaN last, ties in input order (as ``TopKSelector``)."""
    import numpy as np

    s = np.asarray(scores, dtype="float64")
    s = np.where(np.isnan(s), -np.inf, s)
    return np.argsort(-s, kind="stable")[:k]


def funnel_recall(state: StateDir, users: list[int], light_k: int = 200, heavy_k: int = 20, *,
                  config=None, redis_url: str | None = None, as_of=None, rankers=None,
                  weights: dict[str, float] | None = None, seed: int = 0, surface: int | None = None,
                  source_timeout_ms: float | None = 5000.0) -> FunnelReport:
    """Recall@``light_k`` of the heavy ranker's top ``heavy_k``: does the light ranker keep the
    candidates the heavy ranker would pick?

    The two-stage funnel of Twitter's home timeline (the earlybird light ranker cuts the candidate
    set to what the heavy ranker can afford; x-algorithm's two-stage ranking) is only as good as
    the cut: a post the heavy ranker would rank first but the light ranker drops is never served.
    Impression logs show ~3 posts per request, so this is measured on real candidate sets as the
    mixer builds them (~900 per request), not on logged requests:

    1. For each user, one request runs through the served pipeline (``mixer.api.open_resources``
       -> ``mixer.pipeline.build_pipeline``, its ``home_timeline`` declaration and
       ``HomeTimelinePipeline.run``: the query built as served, query hydration, candidate
       sources, candidate hydration, filters, feature hydration) with the scoring stages,
       selectors and side effects removed (nothing is written to Redis: no served-posts record,
       no impression or feature log). The one setting changed is the sources' deadline
       (``source_timeout_ms``): the candidate sets are measured, not the sources' latency, and a
       cold first request must not lose its candidates to a 50 ms timeout.
    2. *All* candidates are scored in-process by the champion light ranker (``light_score`` as
       ``LightRankerScorer`` sets it) and the champion heavy ranker (``HeavyRankerScorer``), both
       loaded from MLflow through ``models.registry`` as the mixer loads them; the heads are
       blended by ``WeightedSumBlender`` with ``weights`` (default: the control arm,
       ``control_weights``).
    3. Per request of n > 0 candidates: H = top ``heavy_k`` by blended score, L = top ``light_k``
       by light score (``TopKSelector``'s order: NaN last, ties in candidate order), recall =
       |H ∩ L| / min(heavy_k, n) (exactly 1 when n <= light_k >= heavy_k). The floor replaces L by
       ``light_k`` candidates in a random order (``numpy.random.default_rng(seed)``).

    Args:
        state: the state folder: MLflow registry (``state.mlflow_tracking_uri``), canonical log
            (default ``as_of``), and its running Redis (default ``redis_url``).
        users: user ids, one request each (``validation_users`` picks real ones).
        light_k: candidates the light ranker keeps (the mixer's ``ranking.heavy_ranker_top_k``).
        heavy_k: the heavy ranker's top that should survive (a page).
        config: ``mixer.config.MixerConfig`` (default: the embedded one); its Redis URL, tracking
            URI, clock, scoring backend and model reloading are overridden here.
        redis_url: Redis with the candidate index and the materialised online features (default:
            the state's running Redis).
        as_of: the request time (datetime / Timestamp / ISO string; default
            ``pipelines.training_set.log_end(state)``: the end of the log, the demo mixer's clock).
        rankers: (light, heavy) ranker handles to measure instead of the champions (tests: a
            light ranker that orders like the heavy one must reach recall 1).
        weights: head -> blend weight (default ``control_weights()``).
        seed: seed of the random floor.
        surface: product surface of the requests (default ``core.schema.HOME_SURFACE``).
        source_timeout_ms: per-source deadline (None: the config's, as served); sources that
            still time out or fail are counted in ``FunnelReport.source_failures``.

    Returns:
        ``FunnelReport`` (summary: ``to_dict`` / ``to_line``; one row per user: ``per_request``).

    Raises:
        ValueError: ``light_k`` or ``heavy_k`` < 1, or no users.
        RuntimeError: no Redis given and the state's Redis is not running.
        redis.RedisError, MLflow errors: Redis or the registered champions are unavailable.
    """
    import numpy as np

    from core.schema import HOME_SURFACE
    from core.services import RedisServer
    from home_mixer.whole_funnel import as_of_generation
    from mixer.blenders import WeightedSumBlender
    from mixer.scorers import HeavyRankerScorer, LightRankerScorer
    from pipelines.training_set import log_end

    if light_k < 1 or heavy_k < 1:
        raise ValueError(f"light_k and heavy_k must be >= 1, got {light_k} and {heavy_k}")
    if not users:
        raise ValueError("funnel recall needs at least one user")
    if redis_url is None:
        srv = RedisServer.running(state)
        if srv is None:
            raise RuntimeError(f"Redis of {state.root} is not running: start it (`home-mixer services start`) "
                               "or pass redis_url")
        redis_url = srv.url
    as_of = pd.Timestamp(as_of if as_of is not None else log_end(state))
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")
    weights = dict(weights if weights is not None else control_weights())
    with as_of_generation(redis_url, state.mlflow_tracking_uri, as_of, rankers=rankers, config=config,
                          source_timeout_ms=source_timeout_ms) as generation:
        served = generation.served
        light = LightRankerScorer(served.rankers.light.handle)
        heavy = HeavyRankerScorer(served.rankers.heavy.handle)
        blender = WeightedSumBlender({"funnel": weights}, heavy.heads)  # the heavy ranker's own order
        rng = np.random.default_rng(seed)
        rows = []
        for uid in users:
            result = generation.pipeline.run(int(uid), surface=HOME_SURFACE if surface is None else surface)
            cands, features = result.ranked or [], result.features
            n = len(cands)
            failed = ",".join(f"{sr.name}:{sr.status}" for sr in result.source_results if sr.status != "ok")
            if n == 0:
                rows.append({"user_id": int(uid), "candidates": 0, "recall": np.nan, "random_recall": np.nan,
                             "degraded": ",".join(result.degraded), "source_failures": failed})
                continue
            query = dataclasses.replace(result.query, arm="funnel")
            light.score(query, cands, features)
            heavy.score(query, cands, features)
            blender.blend(query, cands)
            top_heavy = set(top_indices([c.score for c in cands], heavy_k).tolist())
            top_light = set(top_indices([c.light_score for c in cands], light_k).tolist())
            top_random = set(rng.permutation(n)[:light_k].tolist())
            denom = min(heavy_k, n)
            rows.append({"user_id": int(uid), "candidates": n, "recall": len(top_heavy & top_light) / denom,
                         "random_recall": len(top_heavy & top_random) / denom, "degraded": ",".join(result.degraded),
                         "source_failures": failed})
        per_request = pd.DataFrame(rows, columns=["user_id", "candidates", "recall", "random_recall", "degraded",
                                                  "source_failures"])
        return FunnelReport(light_k=light_k, heavy_k=heavy_k, per_request=per_request,
                            model_versions=served.model_versions, weights=weights, as_of=as_of.isoformat())


def add_funnel_to_report(path: Path, funnel: FunnelReport) -> Path:
    """Put ``funnel.to_dict()`` under the key ``"funnel"`` of the JSON report at ``path`` (the
    evaluation report ``evaluate_log`` / the demo wrote); a new report holding only it when ``path``
    does not exist."""
    import json

    data = json.loads(path.read_text()) if path.exists() else {}
    data["funnel"] = funnel.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path
