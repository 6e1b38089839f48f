"""``home-mixer demo``: the main job end to end on the real KuaiRand data, every stage timed.

Starts Redis, builds features (Spark), registers them (Feast), trains and registers both rankers
(MLflow), materialises features into Redis, builds the candidate index, evaluates the champions on
the validation days, starts the mixer, asks it for real users' home timelines over HTTP, prints
them, then runs the real-time path: the stream processor consumes a live replay of the log's last
hours and the same timelines are asked for again. It stops everything it started (unless
``--keep-running``).

The mixer serves as of the end of the log, on a running clock (``clock.since``): the replayed
events are stamped with the same clock, so for the mixer they happen now, after the batch data.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pandas as pd

from feature_repo import store as fs
from home_mixer import jobs
from home_mixer.demo_fanout import DEMO_CELEBRITY_THRESHOLD, fanout_stage, format_in_network, showcase_timeline
from core.requests import REQUEST_GAP_S
from core.schema import VALIDATION_DAYS
from core.online_store import connect
from core.services import RedisServer
from core.stages import StageTimer
from core.state import StateDir
from mixer.auth import auth_headers
from mixer.server import MixerServer

STAGES = 18
REPLAY_HOURS = 2.5   # the log's last hours replayed by the real-time stage ...
REPLAY_SPEED = 600   # ... at 10 log minutes per wall second (15 s)
FUNNEL_USERS = 100   # validation-day users whose candidate sets measure the light ranker's funnel recall
WHOLE_FUNNEL_USERS = 2000  # users with validation-day engagements in the whole-funnel evaluation (seeded sample)
CANDIDATE_TRAINING_USERS = 4000  # users with label-day engagements whose candidate sets train the light ranker


def start_mixer(state: StateDir, redis_url: str, port: int | None = None,
                config: Path | None = None, timeout_s: float = 120.0,
                name: str = "mixer", workers: int = 1) -> tuple[MixerServer, str]:
    """Start the mixer API as a supervised child process (``mixer.server.MixerServer``) and wait
    for ``/healthz``.

    Args:
        name: the instance's record and log name in ``state/run`` (benchmarks use their own, so a
            mixer left running by the demo is not touched).
        workers: worker processes behind the port (``mixer.server.MixerServer``).

    Returns:
        (the server: ``.stop()`` stops its process tree, base URL ``http://127.0.0.1:PORT``).

    Raises:
        ServiceError: a mixer of this name is already running for the state folder, the port is in
            use, or it exited or did not become healthy within ``timeout_s`` seconds (the message
            has the end of ``state/run/<name>.log``).
    """
    srv = MixerServer(state, name=name, port=port, config=config, redis_url=redis_url,
                      workers=workers).start(timeout_s)
    return srv, srv.url


def pick_users(training_set: pd.DataFrame, n: int) -> list[int]:
    """The ``n`` users with the most impressions in the log (deterministic, ties by id)."""
    counts = training_set.groupby("user_id").size().reset_index(name="n")
    return counts.sort_values(["n", "user_id"], ascending=[False, True])["user_id"].head(n).tolist()


def format_timeline(resp: dict, rows: int = 10, only_source: str | None = None) -> str:
    """A text table of one ``/v1/home-timeline`` response: rank, post, author, scores, source (with
    ``only_source``, only the first ``rows`` items of that source, at their ranks)."""
    lines = [f"user {resp['user_id']}  arm={resp['arm']}  models={resp.get('model_versions')}",
             f"{'#':>2} {'post':>6} {'author':>8} {'score':>7} {'p_click':>7} {'p_lview':>7} "
             f"{'p_like':>7} {'light':>6}  source"]
    shown = [(i, it) for i, it in enumerate(resp["items"], 1) if only_source in (None, it["source"])]
    for i, it in shown[:rows]:
        h = it["heads"]
        lines.append(f"{i:>2} {it['post_id']:>6} {it['author_id']:>8} {it['score']:7.3f} "
                     f"{h['click']:7.3f} {h['long_view']:7.3f} {h['like']:7.4f} "
                     f"{it['light_score']:6.3f}  {it['source']}"
                     f"{' (' + it['source_detail'] + ')' if it.get('source_detail') else ''}")
    lines.append(f"   {len(resp['items'])} items; stage ms: "
                 + ", ".join(f"{k}={v:.1f}" for k, v in resp.get("timings_ms", {}).items()))
    return "\n".join(lines)


def realtime_stage(state: StateDir, redis_url: str, base: str, data_dir: Path, as_of,
                   since, before: list[dict], fanout_config: Path | None = None) -> str:
    """Run the stream processor (a thread) on a live replay of the log's last ``REPLAY_HOURS``
    hours, both on the mixer's running clock, then ask for the users of ``before`` again.

    Returns a text report: events applied, event->online lag p50/p99, consumer lag, the top
    trending posts, and per user how the page changed. The users' served records are cleared first
    so that the pages compare (otherwise the mixer would not serve the same posts twice). The
    replayed follows also update the social graph (and backfill the followee's posts into the
    follower's home timeline) with the ``fanout:`` settings of ``fanout_config``.
    """
    import threading

    from core import online_layout as keys
    from mixer.config import running_clock
    from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
    from pipelines.graph.config import load_fanout_config
    from pipelines.graph.writer import SocialGraphWriter
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.processor import StreamProcessor
    from pipelines.streaming.replay import LogReplayer, load_replay_inputs

    as_of, since = pd.Timestamp(as_of), pd.Timestamp(since)  # tz-aware datetimes or Timestamps
    clock = running_clock(as_of.to_pydatetime(), since.to_pydatetime())
    client = connect(redis_url)
    bus = RedisStreamsBus(client)
    processor = StreamProcessor(client, bus, clock=clock,
                                graph=SocialGraphWriter(client, load_fanout_config(fanout_config)))
    stop = threading.Event()
    worker = threading.Thread(target=processor.run, args=(stop,), kwargs={"block_ms": 100}, daemon=True)
    worker.start()
    try:
        log, videos = load_replay_inputs(data_dir=data_dir)
        stats = LogReplayer(bus, speed=REPLAY_SPEED, wall_clock=clock).replay(
            log, videos, start=as_of - pd.Timedelta(hours=REPLAY_HOURS), end=as_of)
        deadline = time.monotonic() + 30
        # drained = nothing undelivered and nothing unacknowledged (lag None = unknown: keep waiting)
        while time.monotonic() < deadline:
            b = processor.refresh_backlog()
            if b.lag == 0 and b.pending == 0:
                break
            time.sleep(0.1)
    finally:
        stop.set()
        worker.join(timeout=10)
    backlog = processor.refresh_backlog()
    p50, p99 = processor.lag_percentiles()
    now = clock()
    trending = RealtimeFeatureReader(client).trending(now, k=5)
    lines = [f"  replayed {stats.rows:,} log rows = {stats.events_published:,} events in {stats.wall_seconds:.1f} s; "
             f"processor applied {processor.stats['applied']:,} ({dict(processor.stats)})",
             f"  event->online lag p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms; consumer lag {backlog.lag} "
             f"entries, {backlog.pending} pending, {backlog.dead_letters} dead letters",
             "  trending now: " + ", ".join(f"post {p} ({s:.1f})" for p, s in trending),
             # said plainly: the log ends at the batch data's as-of time, so these events are in
             # both; in production the stream carries only what happened after the batch hour
             f"  note: the replayed {REPLAY_HOURS} h are also in the batch counts, so here they count twice; "
             "the stage shows the path (lag, trending, re-ranking), not calibrated counts"]
    for old in before:
        uid = old["user_id"]
        client.delete(keys.served_posts(uid))
        r = httpx.post(f"{base}/v1/home-timeline", json={"user_id": uid, "limit": len(old["items"])},
                       headers=auth_headers(state), timeout=30)
        r.raise_for_status()
        new = r.json()
        old_rank = {it["post_id"]: i for i, it in enumerate(old["items"])}
        moved = [(old_rank.get(it["post_id"]), i) for i, it in enumerate(new["items"])]
        entered = sum(o is None for o, _ in moved)
        up = sum(o is not None and n < o for o, n in moved)
        sources = pd.Series([it["source"] for it in new["items"]]).value_counts().to_dict()
        lines.append(f"  user {uid}: {entered} of {len(moved)} posts new, {up} moved up; sources {sources}")
    client.close()
    return "\n".join(lines)


# The injected fault: one feature of the content table changes unit (ms -> us, x 1000) and another
# arrives empty for a share of the rows, as a broken upstream job would deliver them.
FAULT_UNIT_COLUMN = "post_duration_ms"
FAULT_NULL_COLUMN = "post_click_rate_24h"
FAULT_NULL_SHARE = 0.2


GX_DOCS_INDEX = "gx/uncommitted/data_docs/local_site/index.html"


def fault_gate_stage(state: StateDir) -> list[str]:
    """The injected fault on a copy of the content table, put through the feature-table gate of
    ``materialize`` against the last good run (the demo's own tables); returns the lines to print.
    The state's tables, Redis and gate baseline are untouched."""
    from core.schema import CONTENT_VIEW, FEATURE_VIEWS
    from monitoring.feature_validation import FeatureValidationError, inject_fault, load_profiles, validate_feature_tables

    folder = state.reports / "fault_injection"
    tables = folder / "tables"
    shutil.rmtree(folder, ignore_errors=True)
    tables.mkdir(parents=True)
    for spec in FEATURE_VIEWS:
        if spec is not CONTENT_VIEW:
            (tables / f"{spec.table}.parquet").symlink_to(state.table(spec.table).resolve())
    clean = pd.read_parquet(state.table(CONTENT_VIEW.table))
    inject_fault(clean, FAULT_UNIT_COLUMN, FAULT_NULL_COLUMN, FAULT_NULL_SHARE).to_parquet(
        tables / f"{CONTENT_VIEW.table}.parquet")
    try:
        validate_feature_tables(tables, folder, baseline=load_profiles(state.reports), record=False,
                                until=pd.Timestamp(jobs.log_end(state)))
    except FeatureValidationError as exc:
        return ["The same fault in a copy of the content table, through the feature-table gate of materialize:",
                *(f"  {line}" for line in str(exc).splitlines())]
    return ["The feature-table gate did NOT stop the faulted content table (unexpected)"]


def drift_stage(state: StateDir, valid: pd.DataFrame) -> str:
    """Drift of the validation days against the champion's reference, then of a faulted copy of the
    validation window against the clean one, then the same fault through the feature-table gate;
    returns the lines to print."""
    from home_mixer.drift_job import run_drift
    from monitoring.feature_validation import inject_fault

    days = sorted(int(d) for d in pd.unique(valid["date"]))
    window = f"{days[0]}..{days[-1]}"
    natural = run_drift(state, window=window)
    lines = ["Drift: validation days vs the champion's training reference (Evidently)",
             natural.summary.to_text(top=5), f"  report {natural.html}", ""]
    faulty = inject_fault(valid, FAULT_UNIT_COLUMN, FAULT_NULL_COLUMN, FAULT_NULL_SHARE)
    fault = run_drift(state, against=window, frame=faulty)
    flagged = [c.column for c in fault.summary.drifted_features()]
    lines += [f"Injected fault in a copy of the validation window: {FAULT_UNIT_COLUMN} x 1000, "
              f"{FAULT_NULL_SHARE:.0%} nulls in {FAULT_NULL_COLUMN}; against the clean window the drift job flags "
              f"{flagged} (exit code {0 if fault.summary.passed else 3} at gate {fault.summary.max_drift_share})",
              f"  report {fault.html}", f"  drift dashboard over both runs {fault.dashboard}", ""]
    lines += fault_gate_stage(state)
    lines += ["", *gate_rates_stage(state)]
    return "\n".join(lines)


# the demo's share of bench/drift_gate.py: its validation days, faults on the last one over these
DEMO_GATE_FEATURES = ("post_duration_ms", "user_impressions", "post_impressions_24h", "user_lt_click_rate",
                      "ut_click_rate", "req_post_age_hours")


def gate_rates_stage(state: StateDir) -> list[str]:
    """The drift gate's false-positive and detection rates on the validation days (each against
    the earlier days and the day before) and on faults injected into the last one
    (``monitoring.drift_eval``; all days and more features: ``bench/drift_gate.py``)."""
    from home_mixer.drift_job import served_rows
    from monitoring.drift_eval import evaluate_gate

    rows, origin = served_rows(state)
    result = evaluate_gate(rows, origin, last_days=VALIDATION_DAYS, fault_days=1, features=DEMO_GATE_FEATURES,
                           before_faults=False)
    return ["The drift gate on the validation days and on faults injected into the last one (x 10, / 1000, "
            "20 % nulls, frozen at 3 days before, dropped; 30 % of requests moved to another surface):",
            *(f"  {line}" for line in result.to_table().splitlines())]


def run_demo(state: StateDir, data_dir: Path, users: list[int] | None = None, n_users: int = 3,
             keep_running: bool = False) -> int:
    """Run every stage on the data in ``data_dir``; returns a process exit code."""
    from models.evaluate import evaluate_rankers
    from models.split import split_by_days
    from home_mixer.candidate_training import candidate_training_set
    from models.train import format_ablation, train_heavy, train_light, train_light_on_candidates, train_two_tower
    from pipelines.candidate_index import CanonicalTables, build_candidate_index, build_coengagement
    from pipelines.spark import spark_session
    from home_mixer.drift_job import profile_training_window
    from home_mixer.evaluation import add_funnel_to_report, control_weights, funnel_recall, validation_users
    from home_mixer.whole_funnel import WHOLE_FUNNEL_REPORT, log_to_mlflow, whole_funnel

    timer = StageTimer(total=STAGES)
    started_redis = None
    mixer = None
    try:
        with timer.stage("start Redis"):
            srv = RedisServer.running(state)
            if srv is None:
                srv = started_redis = RedisServer(state).start()
            print(f"  redis {srv.url}")
        with timer.stage("load + validate raw data (great-expectations), canonical tables"):
            rep = jobs.prepare_data(state, data_dir)
            print(f"  {rep.stats}")
        with timer.stage("start Spark (local)"):
            spark = spark_session("home-mixer-demo")
        with timer.stage("Spark offline features (user, long-window user, content, social, user x tag, temporal)"):
            for name, rows in jobs.build_features(spark, state).items():
                print(f"  {name}: {rows:,} rows")
        store = fs.open_store(state, srv.feast_connection_string)
        with timer.stage("feast apply"):
            fs.apply(store, state.tables)
        with timer.stage("training set as served: requests, Feast point-in-time join at the last materialisation"):
            ts = jobs.training_set(spark, store, state)
            print(f"  {len(ts):,} rows x {ts.shape[1]} columns")
        train, valid = split_by_days(ts, valid_days=2)
        print(f"  train {len(train):,} rows (dates {train['date'].min()}..{train['date'].max()}), "
              f"validation {len(valid):,} rows (dates {valid['date'].min()}..{valid['date'].max()})")
        with timer.stage("train light ranker (LightGBM) -> MLflow, register, alias champion"):
            light = train_light(train, valid, state)
            print(f"  run {light.run_id}, version {light.model_version}")
        with timer.stage("train heavy ranker (torch MMoE, 7 heads, id embeddings) + feature-group ablation "
                         "-> MLflow, register, alias champion"):
            heavy = train_heavy(train, valid, state, ablation=True, log=lambda line: print(f"  {line}"))
            profile_training_window(state, heavy.run_id, train, heavy.model)
            print(f"  run {heavy.run_id}, version {heavy.model_version} (reference profile of the training "
                  "window logged with it)")
        with timer.stage("train the two-tower retrieval model (torch, sampled softmax with logQ correction) on the "
                         "engagement sequences before the validation days, FAISS HNSW index -> MLflow, register, "
                         "alias champion"):
            tower = train_two_tower(state, log=lambda line: print(f"  {line}"))
            print(f"  run {tower.run_id}, version {tower.model_version}")
        with timer.stage("validate the feature tables (Great Expectations gate), materialise into Redis (Feast)"):
            jobs.materialize(store, state)
            print(f"  every feature table passed the gate; Data Docs {state.reports / GX_DOCS_INDEX}")
        with timer.stage("candidate index in Redis: co-engagement neighbours (Spark), action sequences, lists"):
            tables = CanonicalTables.load(state)
            neighbours = build_coengagement(spark, tables, jobs.log_end(state), log=lambda line: print(f"  {line}"))
            counts = build_candidate_index(state, srv.url, as_of=jobs.log_end(state), tables=tables,
                                           coengagement=neighbours)
            print(f"  {counts}")
        with timer.stage("light ranker on the mixer's candidate sets as of a cutoff before the validation days "
                         "(labels: the next 2 days' engagements) -> MLflow, register, alias champion"):
            cts = candidate_training_set(state, n_users=CANDIDATE_TRAINING_USERS, spark=spark,
                                         log=lambda line: print(f"  {line}"))
            light = train_light_on_candidates(cts.frame, valid, state, context=cts.run_context())
            print(f"  run {light.run_id}, version {light.model_version}; held-out users' candidate GAUC "
                  f"{light.metrics['valid_candidates_engaged_gauc']:.3f}")
        with timer.stage("evaluate champions on the validation days; light ranker funnel recall"):
            report = evaluate_rankers(valid, control_weights(), tracking_uri=state.mlflow_tracking_uri,
                                      request_gap_s=REQUEST_GAP_S)
            report.to_json(state.reports / "evaluation.json")
            # the light ranker's cut on the mixer's real candidate sets (before any request is served)
            funnel = funnel_recall(state, validation_users(state, FUNNEL_USERS), redis_url=srv.url,
                                   as_of=jobs.log_end(state))
            add_funnel_to_report(state.reports / "evaluation.json", funnel)
        with timer.stage("whole funnel: candidate generation as of the validation days' start vs popularity "
                         "and co-engagement (recall@K, hit rate, NDCG with 95 % intervals) -> MLflow"):
            whole = whole_funnel(state, n_users=WHOLE_FUNNEL_USERS, spark=spark,
                                 log=lambda line: print(f"  {line}"))
            path = whole.to_json(state.reports / WHOLE_FUNNEL_REPORT)
            log_to_mlflow(state, whole, path)
            print(f"  report {path}")
        with timer.stage("drift: validation days vs the champion's training reference; an injected fault"):
            drift_lines = drift_stage(state, valid)
        with timer.stage(f"social graph + fan-out: KuaiRand's follow graph into Redis, the post events replayed "
                         f"through fan-out worker processes (celebrities above {DEMO_CELEBRITY_THRESHOLD} followers pulled)"):
            fan = fanout_stage(state, srv.url, jobs.log_end(state))
            print("\n".join(fan.lines))
        with timer.stage("start the mixer and request home timelines over HTTP"):
            as_of = jobs.log_end(state)
            config = state.run / "demo-mixer.yaml"  # merged over the embedded mixer/mixer.yaml
            since = pd.Timestamp.now(tz="UTC")
            # in-network from the fanned-out home timelines plus celebrity pulls (the stage above)
            config.write_text(f"clock:\n  now: \"{as_of.isoformat()}\"\n  since: \"{since.isoformat()}\"\n"
                              "candidate_sources:\n  in_network:\n    read: timeline\n")
            previous = MixerServer.find(state)
            if previous is not None:  # left by a demo run with --keep-running: it serves the old models
                print(f"  stopping the mixer left running at {previous.url} (pid {previous.pid})")
                previous.stop()
            mixer, base = start_mixer(state, srv.url, config=config)
            print(f"  mixer {base} (OpenAPI at {base}/docs)")
            chosen = users or pick_users(ts, n_users)
            responses = []
            for uid in chosen:
                r = httpx.post(f"{base}/v1/home-timeline", json={"user_id": int(uid), "limit": 20},
                               headers=mixer.auth_headers, timeout=30)
                r.raise_for_status()
                responses.append(r.json())
            # one user's home timeline as the in-network source reads it, then that user's served page
            shown_user, timeline_lines = showcase_timeline(srv.url, fan.showcase_users, as_of.timestamp())
            showcase = None
            if shown_user is not None:
                r = httpx.post(f"{base}/v1/home-timeline", json={"user_id": shown_user, "limit": 100},
                               headers=mixer.auth_headers, timeout=30)
                r.raise_for_status()
                showcase = r.json()
        print()
        for resp in responses:
            print(format_timeline(resp))
            print(f"   {format_in_network(resp)}")
            print()
        if showcase is not None:
            print("\n".join(timeline_lines))
            print(f"  served page of {len(showcase['items'])} posts for this user: {format_in_network(showcase)} "
                  "(KuaiRand users rarely engage twice with one author, so the rankers put in-network posts low)")
            if any(it["source"] == "in_network" for it in showcase["items"]):
                print(format_timeline(showcase, rows=len(showcase["items"]), only_source="in_network"))
            print()
        with timer.stage(f"real time: stream processor + live replay of the log's last {REPLAY_HOURS} h "
                         f"at {REPLAY_SPEED}x, timelines again"):
            rt_report = realtime_stage(state, srv.url, base, data_dir, as_of, since, responses,
                                       fanout_config=fan.config)
        print(rt_report)
        print()
        print("Offline evaluation on the validation days (inside requests, features as served)")
        print(report.to_table())
        print(funnel.to_line())
        print()
        print(whole.to_table("engaged"))
        print()
        print(drift_lines)
        print()
        print("Heavy ranker ablation (request GAUC on the validation days; each feature group removed in turn)")
        print(format_ablation(heavy.ablation))
        print()
        print("Stage times")
        print(timer.summary())
        return 0
    finally:
        if not keep_running:
            if mixer is not None:
                mixer.stop()
            if started_redis is not None:
                started_redis.stop()
