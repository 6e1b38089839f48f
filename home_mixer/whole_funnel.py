"""Whole-funnel evaluation: does the served timeline surface what users go on to engage with?

Candidate generation runs as of the start of the evaluated days (the validation days: the last
``valid_days`` dates of the log), on an online store built only from data before that instant, in
a Redis database of its own (the served one is untouched):

1. the candidate index as of ``as_of`` (``pipelines.candidate_index``: popular lists, tags, graph,
   seen posts, user action sequences) with the co-engagement neighbours of the same cutoff (Spark);
2. the online features as of ``as_of`` (``feast materialize`` up to ``as_of`` from the offline
   tables, whose rows are point-in-time: a row at t uses only events before t);
3. the champion rankers from the MLflow registry (trained on the days before).

For each evaluated user (users with an ``engaged`` positive on those days: all, or a seeded sample)
one request runs the served pipeline (``mixer.pipeline.home_timeline``) up to feature hydration;
then every candidate is scored in-process as serving scores it, and the served order is paged as
the mixer pages it (per page: the ``heavy_ranker_top_k`` best light scores of what is left, the
blended heavy score, author diversity, ``page.default_size`` posts).

Compared orders, each judged by recall@K, hit rate@K, NDCG@K (bootstrap 95 % intervals over users)
and catalogue coverage (``models.retrieval_metrics``), for the positives ``engaged`` (long_view,
like, follow, comment or forward), ``click`` and ``long_view`` of the evaluated days:

- ``source:<name>``: each candidate source alone, in its own order, after the request's filters;
- ``union``: the whole candidate set at the served budget, ordered by the light ranker (its
  recall at the set's size is the ceiling of every later stage);
- ``served``: the served order;
- ``popularity``: the 7-day popularity list as of ``as_of`` (weighted engagements);
- ``coengagement_baseline``: ``models.retrieval_baselines.coengagement_lists`` over the same
  sequences, filled with the popularity list.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from core.online_store import connect
from core.state import StateDir
from models.retrieval_metrics import DEFAULT_KS, OrderSummary, bootstrap_mean_interval, per_user_metrics, summarize_order

WHOLE_FUNNEL_REPORT = "whole_funnel.json"
EVAL_DB = 9  # the Redis database of the as-of store (tests use 0, 3, 6, 7)
POSITIVE_KINDS: tuple[str, ...] = ("engaged", "click", "long_view")
MLFLOW_EXPERIMENT = "home-mixer-evaluation"


@dataclass
class WholeFunnelReport:
    """The whole-funnel evaluation's result.

    Attributes:
        as_of: the cutoff (ISO, UTC): candidate generation sees only what happened before it.
        days: the evaluated dates (yyyymmdd).
        users: evaluated users (with at least one ``engaged`` positive).
        catalogue: posts the index can serve (created before ``as_of``): coverage's denominator.
        orders: positive kind -> order name -> ``OrderSummary``.
        candidates: mean / median candidates per request after the filters.
        union_recall: positive kind -> (mean, low, high): recall of the whole candidate set, the
            ceiling of every ranking stage.
        sources: source name -> {"mean_candidates", "requests_failed"}.
        model_versions: the champions measured.
        seconds: wall time per step.
    """

    as_of: str
    days: list[int]
    users: int
    catalogue: int
    orders: dict[str, dict[str, OrderSummary]]
    candidates: dict[str, float]
    sources: dict[str, dict[str, float]]
    model_versions: dict[str, str]
    union_recall: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {"as_of": self.as_of, "days": self.days, "users": self.users, "catalogue": self.catalogue,
                "candidates": self.candidates, "union_recall": {k: list(v) for k, v in self.union_recall.items()},
                "sources": self.sources, "model_versions": self.model_versions,
                "seconds": self.seconds,
                "orders": {kind: {name: s.to_dict() for name, s in orders.items()}
                           for kind, orders in self.orders.items()}}

    def to_json(self, path: Path) -> Path:
        """Write ``to_dict()`` to ``path`` (parents created)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    def to_table(self, kind: str = "engaged", ks: Sequence[int] = (10, 20, 50, 200, 500)) -> str:
        """A text table: one row per order; recall@K (95 % interval at K=200), hit rate@200, NDCG@20
        and coverage@200 for the ``kind`` positives."""
        orders = self.orders[kind]
        head = (f"whole funnel as of {self.as_of} ({self.users:,} users with {kind} positives on "
                f"{self.days[0]}..{self.days[-1]}; {self.candidates['mean']:.0f} candidates per request)")
        cols = " ".join(f"{'R@' + str(k):>6}" for k in ks)
        if kind in self.union_recall:
            m, lo, hi = self.union_recall[kind]
            head += f"\nrecall of the whole candidate set (the ceiling of the ranking stages): {m:.3f} [{lo:.3f}, {hi:.3f}]"
        lines = [head, f"{'order':<28} {cols} {'R@200 95% CI':>15} {'HR@200':>7} {'NDCG@20':>8} {'cov@200':>8}"]
        for name, s in orders.items():
            r = " ".join(f"{s.recall[k][0]:6.3f}" if k in s.recall else f"{'':>6}" for k in ks)
            ci = s.recall.get(200)
            ci_text = f"[{ci[1]:.3f}, {ci[2]:.3f}]" if ci else ""
            hr = s.hit.get(200, (np.nan,))[0]
            nd = s.ndcg.get(20, (np.nan,))[0]
            cov = s.coverage.get(200, np.nan)
            lines.append(f"{name:<28} {r} {ci_text:>15} {hr:7.3f} {nd:8.3f} {cov:8.3f}")
        return "\n".join(lines)


def evaluated_days(impressions: pd.DataFrame, valid_days: int) -> tuple[list[int], pd.Timestamp]:
    """The last ``valid_days`` dates of the log and the cutoff: the first impression of those days
    (``models.split.held_out_days``).

    Raises:
        ValueError: the log has no more than ``valid_days`` dates (nothing before the cutoff).
    """
    from models.split import held_out_days

    return held_out_days(impressions, valid_days)


def positives_by_user(impressions: pd.DataFrame, days: Sequence[int]) -> dict[str, dict[int, set[int]]]:
    """Per positive kind (``POSITIVE_KINDS``), user -> the posts with that positive on ``days``."""
    from pipelines.sequences import ENGAGED_HEADS

    rows = impressions[impressions["date"].isin(list(days))]
    masks = {"engaged": rows[list(ENGAGED_HEADS)].fillna(0).to_numpy().sum(axis=1) > 0,
             "click": rows["click"].fillna(0).to_numpy() > 0,
             "long_view": rows["long_view"].fillna(0).to_numpy() > 0}
    out = {}
    for kind, mask in masks.items():
        sub = rows.loc[mask, ["user_id", "post_id"]]
        out[kind] = {int(u): set(int(p) for p in g) for u, g in sub.groupby("user_id")["post_id"]}
    return out


def served_order(cands: list, page_size: int, heavy_k: int, diversity, max_items: int) -> list[int]:
    """Post ids in the order the mixer's pages would show them (module docstring, step 3).

    ``cands`` carry ``light_score`` and the blended ``score`` of every candidate (the heavy ranker
    scores a post the same on any page: its features are fixed within the evaluation instant).
    ``diversity``: the ``AuthorDiversitySelector`` of the served pipeline.
    """
    from home_mixer.evaluation import top_indices
    from mixer.candidate import Query

    remaining = list(cands)
    order: list[int] = []
    q = Query(user_id=0, page_size=page_size, now_s=0.0, request_id="funnel")
    while remaining and len(order) < max_items:
        light = [c.light_score for c in remaining]
        top = [dataclasses.replace(remaining[i]) for i in top_indices(light, heavy_k)]  # copies: diversity rescales
        page = diversity.select(q, top).candidates[:page_size]
        if not page:
            break
        shown = {c.post_id for c in page}
        order += [c.post_id for c in page]
        remaining = [c for c in remaining if c.post_id not in shown]
    return order[:max_items]


def as_of_redis(state: StateDir, db: int = EVAL_DB) -> tuple[str, str]:
    """(redis URL, Feast connection string) of database ``db`` of the state's running Redis.

    Raises:
        RuntimeError: the state's Redis is not running (``home-mixer services start``).
    """
    from core.services import RedisServer

    srv = RedisServer.running(state)
    if srv is None:
        raise RuntimeError(f"Redis of {state.root} is not running: `home-mixer services start`, or pass redis_url")
    return f"redis://127.0.0.1:{srv.port}/{db}", f"{srv.feast_connection_string},db={db}"


def prepare_as_of_store(state: StateDir, redis_url: str, feast_connection: str | None, as_of: pd.Timestamp,
                        spark=None, log: Callable[[str], None] = print) -> dict[str, float]:
    """Build the online store as of ``as_of`` in ``redis_url``'s database (flushed first): the
    candidate index with co-engagement neighbours and action sequences of that cutoff, and the
    Feast features materialised up to it. Returns wall seconds per step ("index", "materialize").

    Args:
        feast_connection: the same database in Feast's form (``host:port,db=N``).
        spark: a Spark session for the co-engagement job (default: a local one).

    Raises:
        ValueError: no ``feast_connection``, or the database holds a mixer's served records (a
            serving store: nothing is flushed).
        FileNotFoundError: a canonical table is missing (``home-mixer features build``).
    """

    from feature_repo import store as fs
    from pipelines.candidate_index import CanonicalTables, build_candidate_index, build_coengagement
    from pipelines.features.common import BASE_ROW_TS
    from pipelines.training_set import log_span

    from core import online_layout as layout

    if feast_connection is None:
        raise ValueError("pass feast_connection with redis_url (host:port,db=N) to build the as-of store")
    seconds = {}
    client = connect(redis_url)
    try:
        # the evaluation never serves: a database with served records is a serving store, not ours to flush
        if client.exists(layout.SERVED_IMPRESSIONS, layout.SERVED_FEATURES):
            raise ValueError(f"{redis_url} holds a mixer's served records: it is a serving store; give the "
                             f"whole-funnel evaluation a database of its own (default db {EVAL_DB})")
        client.flushdb()
    finally:
        client.close()
    if spark is None:
        from pipelines.spark import spark_session

        spark = spark_session("home-mixer-as-of-store")
    t0 = time.perf_counter()
    tables = CanonicalTables.load(state)
    neighbours = build_coengagement(spark, tables, as_of, log=log)
    counts = build_candidate_index(state, redis_url, as_of, tables=tables, coengagement=neighbours)
    seconds["index"] = time.perf_counter() - t0
    log(f"index as of {as_of.isoformat()}: {counts}")
    t0 = time.perf_counter()
    ev_state = StateDir(state.root / "eval" / f"funnel-{as_of.strftime('%Y%m%dT%H%M%S')}").ensure()
    store = fs.open_store(ev_state, feast_connection)
    fs.apply(store, state.tables)
    start = min(BASE_ROW_TS.to_pydatetime(), log_span(state)[0])
    fs.materialize(store, start, as_of.to_pydatetime())
    seconds["materialize"] = time.perf_counter() - t0
    log(f"online features materialised up to {as_of.isoformat()} in {seconds['materialize']:.1f} s")
    return seconds


@dataclass
class AsOfGeneration:
    """The served pipeline up to feature hydration over an as-of store (``as_of_generation``).

    Attributes:
        config: the mixer config used (the served one, pointed at the as-of store and clock).
        served: the full served pipeline (its rankers, model versions).
        pipeline: the candidates-only pipeline: sources, hydration, filters, feature hydration; no
            scoring, selection or side effect (nothing is written).
    """

    config: object
    served: object
    pipeline: object

    def run(self, user_id: int):
        """One request for ``user_id`` on the home surface: the pipeline's result (``ranked`` holds
        the filtered candidates, ``features`` their hydrated features, row i for candidate i)."""
        from core.schema import HOME_SURFACE

        return self.pipeline.run(int(user_id), surface=HOME_SURFACE)


@contextmanager
def as_of_generation(redis_url: str, tracking_uri: str, as_of: pd.Timestamp, rankers=None, config=None,
                     source_timeout_ms: float | None = 5000.0, retrieval="load"):
    """Open the served candidate generation over the as-of store in ``redis_url`` with the mixer's
    clock at ``as_of``: yields an :class:`AsOfGeneration`, closes its resources on exit.

    The config is ``config`` (default: the embedded ``mixer/mixer.yaml``) pointed at ``redis_url``
    and ``tracking_uri``, with in-process scoring, no model reloads, no feature logging or drift
    sampling, and source deadlines of at least ``source_timeout_ms`` (None: as configured). The
    candidate sets are measured, not the sources' latency: a cold request must not time out.

    Args:
        rankers: (light, heavy) handles instead of the champions of ``tracking_uri``.
        retrieval: the embedding source's two-tower handle (``"load"``: the registered champion, if
            any; None: without learned retrieval).

    Raises:
        redis.RedisError: ``redis_url`` does not answer. MLflow errors: no champions registered.
    """
    from mixer.api import open_resources
    from mixer.config import load_config
    from mixer.metrics import MixerMetrics
    from mixer.pipeline import HomeTimelinePipeline

    config = config or load_config(None)
    config = config.with_overrides(
        redis_url=redis_url,
        models={**config.models.model_dump(), "tracking_uri": tracking_uri, "reload_interval_s": 0},
        scoring={**config.scoring.model_dump(), "backend": "in_process"},
        clock={"now": as_of.isoformat(), "since": None},
        feature_logging={**config.feature_logging.model_dump(), "enabled": False},
        drift_sample={**config.drift_sample.model_dump(), "enabled": False},
    )
    if source_timeout_ms is not None:
        config = config.with_overrides(candidate_sources={
            name: {**s, "timeout_ms": max(float(s["timeout_ms"]), float(source_timeout_ms))}
            for name, s in config.candidate_sources.model_dump().items()})
    metrics = MixerMetrics()
    res = open_resources(config, metrics, rankers=rankers, retrieval=retrieval)
    try:
        served = res.pipeline

        def candidates_only(r):  # the served declaration up to feature hydration, nothing written
            return dataclasses.replace(served.declare(r), scoring=(), selectors=(), side_effects=())

        pipeline = HomeTimelinePipeline(config=config, declare=candidates_only, rankers=served.rankers,
                                        executor=res.executor, metrics=metrics)
        yield AsOfGeneration(config, served, pipeline)
    finally:
        res.close()


def _run_param(tracking_uri: str, run_id: str | None, key: str) -> str | None:
    """Param ``key`` of MLflow run ``run_id`` (None without a run or the param)."""
    if not run_id:
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri).get_run(run_id).data.params.get(key)


def trained_after(retrieval, tracking_uri: str, as_of: pd.Timestamp) -> bool:
    """Whether the two-tower ``retrieval`` saw events at or after ``as_of`` (its run's ``as_of``
    param; a run without one counts as after: nothing says it did not)."""
    trained = _run_param(tracking_uri, retrieval.run_id, "as_of")
    return trained is None or pd.Timestamp(trained) > as_of


def check_trained_before(retrieval, tracking_uri: str, as_of: pd.Timestamp) -> None:
    """Raise ValueError when the two-tower model ``retrieval`` (None: nothing to check) was trained
    on events after ``as_of``, which would leak the evaluated days into the candidate sets."""
    if retrieval is not None and trained_after(retrieval, tracking_uri, as_of):
        trained = _run_param(tracking_uri, retrieval.run_id, "as_of") or "an unrecorded cutoff"
        raise ValueError(f"two-tower v{retrieval.version} was trained on events up to {trained}, after the cutoff "
                         f"{as_of.isoformat()}: it has seen the evaluated days; pass one trained before it "
                         "(home_mixer.candidate_training.as_of_two_tower)")


def check_labels_before(light, tracking_uri: str, days: Sequence[int]) -> None:
    """Raise ValueError when the light ranker ``light`` was trained on candidate sets labelled by
    one of the evaluated ``days`` (its run's ``label_days`` param; impression-trained rankers have
    none and are split by day at training)."""
    labels = _run_param(tracking_uri, getattr(light, "run_id", None), "label_days")
    if labels and max(int(d) for d in labels.split(",")) >= min(days):
        raise ValueError(f"light ranker v{light.version} was trained on the engagements of {labels}, which overlap "
                         f"the evaluated days {days[0]}..{days[-1]}: retrain it with the same --valid-days "
                         "(`home-mixer train --model light --light-on candidates`)")


def funnel_retrieval(state: StateDir, as_of: pd.Timestamp, log: Callable[[str], None]):
    """The two-tower the whole funnel serves: the registered champion when it was trained before
    ``as_of``; otherwise (it has seen the evaluated days) the champion's model trained again on the
    events before ``as_of`` (``home_mixer.candidate_training.as_of_two_tower``); None without one."""
    from models.registry import RankerNotFoundError, load_two_tower

    try:
        champion = load_two_tower(state.mlflow_tracking_uri)
    except RankerNotFoundError:
        return None
    if not trained_after(champion, state.mlflow_tracking_uri, as_of):
        return champion
    from home_mixer.candidate_training import as_of_two_tower

    log(f"two-tower v{champion.version} has seen events after {as_of.isoformat()}: training one before it")
    return as_of_two_tower(state, as_of, log)


def whole_funnel(state: StateDir, *, redis_url: str | None = None, feast_connection: str | None = None,
                 valid_days: int = 2, n_users: int | None = 2000, seed: int = 0, ks: Sequence[int] = DEFAULT_KS,
                 spark=None, prepare: bool = True, n_boot: int = 1000, rankers=None,
                 log: Callable[[str], None] | None = print) -> WholeFunnelReport:
    """Run the whole-funnel evaluation (module docstring).

    Args:
        state: the state folder with canonical tables, feature tables, Feast registry and champions.
        redis_url: the Redis database for the as-of store (default: the state's Redis, db ``EVAL_DB``);
            it is flushed first.
        feast_connection: the same database in Feast's form (``host:port,db=N``; default derived).
        valid_days: the last dates evaluated.
        n_users: a seeded sample of the users with positives (None: all of them).
        seed: the sample's and the bootstrap's seed.
        ks: cut-offs.
        spark: a Spark session (default ``pipelines.spark.spark_session``).
        prepare: build the as-of store (False: ``redis_url`` already holds it; tests reuse one).
        n_boot: bootstrap resamples.
        rankers: (light, heavy) handles instead of the champions.
        log: progress lines (None: quiet).

    Returns:
        ``WholeFunnelReport``.

    Raises:
        FileNotFoundError: a canonical table is missing (``home-mixer features build``).
        RuntimeError: no Redis given and the state's Redis is not running.
        ValueError: too few dates, no user with positives, or ``redis_url`` is a serving store
            (it holds a mixer's served records; nothing is flushed).
    """
    from tqdm import tqdm

    from home_mixer.evaluation import control_blender, top_indices
    from mixer.scorers import HeavyRankerScorer, LightRankerScorer
    from mixer.selectors import AuthorDiversitySelector
    from models.retrieval_baselines import coengagement_lists
    from pipelines.sequences import engagement_sequences

    say = log or (lambda line: None)
    if redis_url is None:
        redis_url, default_connection = as_of_redis(state)
        feast_connection = feast_connection or default_connection
    imp = pd.read_parquet(state.table("impressions"))
    days, as_of = evaluated_days(imp, valid_days)
    positives = positives_by_user(imp, days)
    users = sorted(positives["engaged"])
    if not users:
        raise ValueError(f"no user has an engaged positive on {days}")
    if n_users is not None and len(users) > n_users:
        users = sorted(int(u) for u in np.random.default_rng(seed).choice(users, size=n_users, replace=False))
    seconds: dict[str, float] = {}
    if prepare:
        seconds |= prepare_as_of_store(state, redis_url, feast_connection, as_of, spark, say)

    lists: dict[str, list[list[int]]] = {}
    n_cands: list[int] = []
    source_sizes: dict[str, list[int]] = {}
    source_failures: dict[str, int] = {}
    t0 = time.perf_counter()
    retrieval = funnel_retrieval(state, as_of, say)
    with as_of_generation(redis_url, state.mlflow_tracking_uri, as_of, rankers=rankers,
                          retrieval=retrieval) as generation:
        config = generation.config
        served = generation.served
        check_trained_before(served.rankers.retrieval, state.mlflow_tracking_uri, as_of)
        check_labels_before(served.rankers.light.handle, state.mlflow_tracking_uri, days)
        light = LightRankerScorer(served.rankers.light.handle)
        heavy = HeavyRankerScorer(served.rankers.heavy.handle)
        blender = control_blender(heavy.heads)  # as the control arm blends, light score included
        diversity = AuthorDiversitySelector(config.filters.max_posts_per_author, config.ranking.author_diversity_decay,
                                            config.ranking.author_diversity_floor)
        max_k = max(ks)
        for uid in tqdm(users, desc="whole funnel", unit="user", disable=log is None, mininterval=5):
            result = generation.run(uid)
            cands, features = result.ranked or [], result.features
            kept = {c.post_id for c in cands}
            n_cands.append(len(cands))
            for sr in result.source_results:
                source_sizes.setdefault(sr.name, []).append(len(sr.candidates))
                if sr.status != "ok":
                    source_failures[sr.name] = source_failures.get(sr.name, 0) + 1
                lists.setdefault(f"source:{sr.name}", []).append(
                    [c.post_id for c in sr.candidates if c.post_id in kept])
            if cands:
                query = dataclasses.replace(result.query, arm="funnel")
                light.score(query, cands, features)
                heavy.score(query, cands, features)
                blender.blend(query, cands)
                by_light = [cands[i].post_id for i in top_indices([c.light_score for c in cands], len(cands))]
                order = served_order(cands, config.page.default_size, config.ranking.heavy_ranker_top_k,
                                     diversity, max_k)
            else:
                by_light, order = [], []
            lists.setdefault("union", []).append(by_light)
            lists.setdefault("served", []).append(order)
        seconds["requests"] = time.perf_counter() - t0
        model_versions = served.model_versions

    t0 = time.perf_counter()

    from core import online_layout as layout
    from pipelines.candidate_index import CanonicalTables

    # the popularity list and the catalogue as the as-of store holds them (what the popular source reads)
    client = connect(redis_url)
    try:
        popular = [int(p) for p in client.zrevrange(layout.popular("7d"), 0, -1)]
        catalogue = int(client.hget(layout.INDEX_META, "posts") or 0)
    finally:
        client.close()
    if catalogue < 1:
        raise ValueError(f"{redis_url} holds no candidate index (no posts in {layout.INDEX_META}): build the "
                         "as-of store first (prepare=True)")
    tables = CanonicalTables.load(state)
    lists["popularity"] = [popular[:max(ks)]] * len(users)
    sequences = engagement_sequences(tables.impressions, tables.prelog_events, as_of)
    baseline = coengagement_lists(sequences, users, popular, k=max(ks))
    lists["coengagement_baseline"] = [baseline[u] for u in users]
    seconds["baselines"] = time.perf_counter() - t0

    first = ["served", "union", "popularity", "coengagement_baseline"]
    names = first + sorted(n for n in lists if n not in first)
    orders: dict[str, dict[str, OrderSummary]] = {}
    union_recall = {}
    for kind in POSITIVE_KINDS:
        pos = positives[kind]
        idx = [i for i, u in enumerate(users) if u in pos]
        whole = np.array([len(pos[users[i]] & set(lists["union"][i])) / len(pos[users[i]]) for i in idx])
        union_recall[kind] = tuple(float(x) for x in bootstrap_mean_interval(whole, n_boot=n_boot, seed=seed))
        orders[kind] = {}
        for name in names:
            m = per_user_metrics([lists[name][i] for i in idx], [pos[users[i]] for i in idx], ks)
            orders[kind][name] = summarize_order(name, m, catalogue, n_boot=n_boot, seed=seed)
    n = np.asarray(n_cands, dtype="float64")
    report = WholeFunnelReport(
        as_of=as_of.isoformat(), days=days, users=len(users), catalogue=catalogue, orders=orders,
        candidates={"mean": float(n.mean()), "median": float(np.median(n))},
        sources={s: {"mean_candidates": float(np.mean(v)), "requests_failed": source_failures.get(s, 0)}
                 for s, v in source_sizes.items()},
        model_versions=dict(model_versions), union_recall=union_recall, seconds=seconds)
    return report


def log_to_mlflow(state: StateDir, report: WholeFunnelReport, path: Path) -> str:
    """Log the report as an MLflow run of experiment ``MLFLOW_EXPERIMENT`` in the state's tracking
    store: metrics ``<kind>.<order>.recall_at_<K>`` / ``hit_rate_at_<K>`` / ``ndcg_at_<K>``, the
    JSON at ``path`` as an artifact, the champions' versions as params. Returns the run id.

    Uses an explicit ``MlflowClient`` (not the fluent API, whose tracking URI and active run are
    process-wide), so the caller's MLflow settings are untouched."""
    import time as _time

    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state.mlflow_tracking_uri)
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(MLFLOW_EXPERIMENT)
    run = client.create_run(experiment_id, run_name=f"whole-funnel {report.as_of}")
    run_id = run.info.run_id
    now = int(_time.time() * 1000)
    params = {"as_of": report.as_of, "users": str(report.users), "days": ",".join(map(str, report.days)),
              **{f"version.{k}": str(v) for k, v in report.model_versions.items()}}
    metrics = []
    for kind, orders in report.orders.items():
        for name, s in orders.items():
            safe = name.replace(":", ".")
            for k in s.ks:
                for metric, values in (("recall", s.recall), ("hit_rate", s.hit), ("ndcg", s.ndcg)):
                    v = float(values[k][0])
                    if np.isfinite(v):
                        metrics.append(Metric(f"{kind}.{safe}.{metric}_at_{k}", v, now, 0))
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run_id, metrics=metrics[i:i + 1000])
        client.log_artifact(run_id, str(path))
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    return run_id


__all__ = ["AsOfGeneration", "EVAL_DB", "as_of_generation", "as_of_redis", "check_labels_before", "check_trained_before", "funnel_retrieval", "prepare_as_of_store", "POSITIVE_KINDS", "WHOLE_FUNNEL_REPORT", "WholeFunnelReport", "evaluated_days",
           "log_to_mlflow", "positives_by_user", "served_order", "whole_funnel"]
