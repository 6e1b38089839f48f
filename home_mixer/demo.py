"""``home-mixer demo``: the main job end to end on the real KuaiRand data, every stage timed.

Starts Redis, builds features (Spark), registers them (Feast), trains and registers both rankers
(MLflow), materialises features into Redis, builds the candidate index, evaluates the champions on
the validation days, starts the mixer, asks it for real users' home timelines over HTTP, prints
them, and stops everything it started (unless ``--keep-running``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd

from home_mixer import feature_store as fs
from home_mixer import jobs
from home_mixer.services import RedisServer, ServiceError, free_port, stop_pid
from home_mixer.stages import StageTimer
from home_mixer.state import StateDir

STAGES = 12


def start_mixer(state: StateDir, redis_url: str, port: int | None = None,
                config: Path | None = None, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start the mixer API (uvicorn) as a child process and wait for ``/healthz``.

    Returns:
        (process, base URL ``http://127.0.0.1:PORT``).

    Raises:
        ServiceError: it exited or did not become healthy within ``timeout_s`` seconds (its log is
            in ``state/run/mixer.log``).
    """
    port = port or free_port()
    env = {**os.environ, "HOME_MIXER_STATE": str(state.root), "HOME_MIXER_REDIS_URL": redis_url,
           "MLFLOW_TRACKING_URI": state.mlflow_tracking_uri}
    cmd = [sys.executable, "-m", "mixer.api", "--host", "127.0.0.1", "--port", str(port)]
    if config:
        cmd += ["--config", str(config)]
    log_path = state.run / "mixer.log"
    with open(log_path, "ab") as log:  # the child keeps its own copy
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    (state.run / "mixer.pid").write_text(str(proc.pid))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServiceError(f"the mixer exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop_pid(proc.pid)
    raise ServiceError(f"the mixer did not become healthy in {timeout_s:.0f} s; see {log_path}")


def pick_users(training_set: pd.DataFrame, n: int) -> list[int]:
    """The ``n`` users with the most impressions in the log (deterministic, ties by id)."""
    counts = training_set.groupby("user_id").size().reset_index(name="n")
    return counts.sort_values(["n", "user_id"], ascending=[False, True])["user_id"].head(n).tolist()


def format_timeline(resp: dict, rows: int = 10) -> str:
    """A text table of one ``/v1/home-timeline`` response: rank, post, author, scores, source."""
    lines = [f"user {resp['user_id']}  arm={resp['arm']}  models={resp.get('model_versions')}",
             f"{'#':>2} {'post':>6} {'author':>8} {'score':>7} {'p_click':>7} {'p_lview':>7} "
             f"{'p_like':>7} {'light':>6}  source"]
    for i, it in enumerate(resp["items"][:rows], 1):
        h = it["heads"]
        lines.append(f"{i:>2} {it['post_id']:>6} {it['author_id']:>8} {it['score']:7.3f} "
                     f"{h['click']:7.3f} {h['long_view']:7.3f} {h['like']:7.4f} "
                     f"{it['light_score']:6.3f}  {it['source']}{' (in-network)' if it['in_network'] else ''}")
    lines.append(f"   {len(resp['items'])} items; stage ms: "
                 + ", ".join(f"{k}={v:.1f}" for k, v in resp.get("timings_ms", {}).items()))
    return "\n".join(lines)


def run_demo(state: StateDir, data_dir: Path, users: list[int] | None = None, n_users: int = 3,
             keep_running: bool = False) -> int:
    """Run every stage on the data in ``data_dir``; returns a process exit code."""
    from models.evaluate import evaluate_rankers
    from models.split import split_by_days
    from models.train import train_heavy, train_light
    from pipelines.candidate_index import build_candidate_index
    from pipelines.spark import spark_session
    from home_mixer.evaluation import control_weights

    timer = StageTimer(total=STAGES)
    started_redis = None
    mixer_proc = None
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
        with timer.stage("Spark offline features (user, content, social, temporal)"):
            for name, rows in jobs.build_features(spark, state).items():
                print(f"  {name}: {rows:,} rows")
        store = fs.open_store(state, srv.feast_connection_string)
        with timer.stage("feast apply"):
            fs.apply(store, state.tables)
        with timer.stage("training set: Feast point-in-time join (Spark offline store)"):
            ts = jobs.training_set(spark, store, state)
            print(f"  {len(ts):,} rows x {ts.shape[1]} columns")
        train, valid = split_by_days(ts, valid_days=2)
        print(f"  train {len(train):,} rows (dates {train['date'].min()}..{train['date'].max()}), "
              f"validation {len(valid):,} rows (dates {valid['date'].min()}..{valid['date'].max()})")
        with timer.stage("train light ranker (LightGBM) -> MLflow, register, alias champion"):
            light = train_light(train, valid, state)
            print(f"  run {light.run_id}, version {light.model_version}")
        with timer.stage("train heavy ranker (torch multi-task, 7 heads) -> MLflow, register, alias champion"):
            heavy = train_heavy(train, valid, state)
            print(f"  run {heavy.run_id}, version {heavy.model_version}")
        with timer.stage("materialise features into Redis (Feast)"):
            jobs.materialize(store, state)
        with timer.stage("candidate index in Redis"):
            counts = build_candidate_index(state, srv.url, as_of=jobs.log_end(state))
            print(f"  {counts}")
        with timer.stage("evaluate champions on the validation days"):
            report = evaluate_rankers(valid, control_weights(), tracking_uri=state.mlflow_tracking_uri)
            report.to_json(state.reports / "evaluation.json")
        with timer.stage("start the mixer and request home timelines over HTTP"):
            as_of = jobs.log_end(state)
            config = state.run / "demo-mixer.yaml"  # merged over the embedded mixer/mixer.yaml
            config.write_text(f"clock:\n  now: \"{as_of.isoformat().replace('+00:00', 'Z')}\"\n")
            mixer_proc, base = start_mixer(state, srv.url, config=config)
            print(f"  mixer {base} (OpenAPI at {base}/docs)")
            chosen = users or pick_users(ts, n_users)
            responses = []
            for uid in chosen:
                r = httpx.post(f"{base}/v1/home-timeline", json={"user_id": int(uid), "limit": 20}, timeout=30)
                r.raise_for_status()
                responses.append(r.json())
        print()
        for resp in responses:
            print(format_timeline(resp))
            print()
        print("Offline evaluation on the validation days")
        print(report.to_table())
        print()
        print("Stage times")
        print(timer.summary())
        return 0
    finally:
        if not keep_running:
            if mixer_proc is not None:
                stop_pid(mixer_proc.pid)
            if started_redis is not None:
                started_redis.stop()
