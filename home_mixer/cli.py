"""``home-mixer`` command line: the demo, services, features, training, evaluation, serving, clean.

Every command works on one state folder (``--state`` or ``$HOME_MIXER_STATE``, default
``<checkout>/.state``) and prints a clear error, not a traceback, for a user's mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.state import DEFAULT_DATA_DIR, StateDir, state_from_cli


class UsageError(ValueError):
    """A command was called with arguments that cannot work; the message says what to change."""


def _state(args) -> StateDir:
    return state_from_cli(args.state)


def cmd_demo(args) -> int:
    from home_mixer.demo import run_demo

    return run_demo(_state(args), Path(args.data), users=args.users, n_users=args.n_users,
                    keep_running=args.keep_running)


def cmd_services(args) -> int:
    from core.services import RedisServer

    state = _state(args)
    running = RedisServer.running(state)
    if args.action == "start":
        if running:
            print(f"redis already running: {running.url} (pid {running.pid})")
        else:
            srv = RedisServer(state).start()
            print(f"redis started: {srv.url} (pid {srv.pid})")
    elif args.action == "stop":
        if running:
            running.stop()
            print("redis stopped")
        else:
            print("redis is not running")
    else:
        print(f"redis: {'running ' + running.url if running else 'stopped'}")
    return 0


def cmd_env(args) -> int:
    from home_mixer.jobs import feast_connection, redis_url_for

    state = _state(args)
    url = redis_url_for(state)
    print(f"export HOME_MIXER_STATE={state.root}")
    print(f"export HOME_MIXER_REDIS_URL={url}")
    print(f"export HOME_MIXER_REDIS={feast_connection(url)}")
    print(f"export MLFLOW_TRACKING_URI={state.mlflow_tracking_uri}")
    print("export SPARK_LOCAL_IP=127.0.0.1")
    return 0


def cmd_features(args) -> int:
    from feature_repo import store as fs
    from home_mixer import jobs
    from core.stages import StageTimer
    from pipelines.spark import spark_session

    state = _state(args)
    url = jobs.redis_url_for(state)
    timer = StageTimer(total=5 if args.materialize else 4)
    with timer.stage("load + validate raw data, write canonical tables"):
        logs = [Path(p) for p in args.log] if args.log else None
        rep = jobs.prepare_data(state, Path(args.data), log_paths=logs)
        print(rep.stats)
    spark = spark_session("home-mixer-features")
    with timer.stage("Spark offline features"):
        print(jobs.build_features(spark, state))
    store = fs.open_store(state, jobs.feast_connection(url))
    with timer.stage("feast apply"):
        fs.apply(store, state.tables)
    with timer.stage("point-in-time training set (get_historical_features)"):
        df = jobs.training_set(spark, store, state)
        print(f"training set: {len(df):,} rows x {df.shape[1]} columns")
    if args.materialize:
        with timer.stage("materialise to Redis"):
            print(jobs.materialize(store, state))
    print(timer.summary())
    return 0


def cmd_materialize(args) -> int:
    from feature_repo import store as fs
    from home_mixer import jobs

    state = _state(args)
    store = fs.open_store(state, jobs.feast_connection(jobs.redis_url_for(state)))
    start, end = jobs.materialize(store, state)
    print(f"materialised {start.isoformat()} .. {end.isoformat()}")
    return 0


def cmd_train(args) -> int:
    from home_mixer import jobs
    from models.split import split_by_days
    from models.train import train_heavy, train_light

    from core.schema import VALIDATION_DAYS

    state = _state(args)
    if not 1 <= args.valid_days <= VALIDATION_DAYS:
        raise UsageError(f"--valid-days must be 1..{VALIDATION_DAYS}: the feature smoothing priors were "
                         f"computed with the last {VALIDATION_DAYS} days held out, so validating on more "
                         "days would leak their labels into the features")
    train, valid = split_by_days(jobs.load_training_set(state), valid_days=args.valid_days)
    results = {}
    if args.model in ("light", "both"):
        results["light_ranker"] = train_light(train, valid, state, register=not args.no_register,
                                              set_champion=not args.no_promote)
    if args.model in ("heavy", "both"):
        results["heavy_ranker"] = train_heavy(train, valid, state, register=not args.no_register,
                                              set_champion=not args.no_promote)
    for name, res in results.items():
        print(f"{name}: run {res.run_id} version {res.model_version}")
        print(json.dumps(res.metrics, indent=1, default=float))
    return 0


def cmd_evaluate(args) -> int:
    from home_mixer.evaluation import evaluate_log

    state = _state(args)
    report = evaluate_log(state, Path(args.log), data_dir=Path(args.data),
                          history=Path(args.history) if args.history else None,
                          from_date=args.from_date, out=Path(args.out) if args.out else None)
    print(report.to_table())
    return 0


def cmd_promote(args) -> int:
    from models.registry import promote

    import time

    from models.registry import alias_version, RankerNotFoundError
    from serving.triton.server import TritonServer

    state = _state(args)
    uri = state.mlflow_tracking_uri
    name = {"light": "light_ranker", "heavy": "heavy_ranker"}[args.model]
    try:
        previous = alias_version(name, args.alias, tracking_uri=uri)
    except RankerNotFoundError:
        previous = None
    started = time.monotonic()
    promote(name, args.version, alias=args.alias, tracking_uri=uri)
    print(f"{name}@{args.alias} -> version {args.version}")
    triton = TritonServer.running(state)
    if triton is not None:  # export the version if new, then (re)load it: no Triton restart
        from serving.export import validation_rows
        from serving.triton.repository import sync_repository

        try:
            sync_repository(uri, triton.repo_dir, check_rows=lambda: validation_rows(state, n=2000),
                            models=(name,))
            print(f"triton: {name} ready versions {triton.load(name)} "
                  f"({time.monotonic() - started:.1f} s after promote)")
        except Exception as exc:  # the alias must not point at a version the servers cannot serve
            if previous is not None:
                promote(name, previous, alias=args.alias, tracking_uri=uri)
            raise UsageError(f"Triton could not serve {name} v{args.version} ({type(exc).__name__}: {exc}); "
                             f"{args.alias} moved back to v{previous}") from exc
    print("mixers pick the new version up within models.reload_interval_s (default 5 s), no restart")
    return 0


def cmd_serve_mixer(args) -> int:
    from home_mixer import jobs
    from mixer.api import main as serve_main

    state = _state(args)
    argv = ["--host", args.host, "--port", str(args.port), "--redis-url", jobs.redis_url_for(state)]
    if args.config:
        argv += ["--config", args.config]
    os.environ.setdefault("MLFLOW_TRACKING_URI", state.mlflow_tracking_uri)
    serve_main(argv)
    return 0


def cmd_stream(args) -> int:
    """``stream run``: the stream processor until Ctrl-C; ``stream replay``: a log into the bus."""
    from home_mixer import jobs

    state = _state(args)
    url = jobs.redis_url_for(state)
    if args.action == "replay":
        from pipelines.streaming.replay import main as replay_main

        argv = ["--redis-url", url, "--speed", str(args.speed), "--time", args.time]
        for flag in ("log", "limit", "start", "end"):
            if getattr(args, flag):
                argv += [f"--{flag}", str(getattr(args, flag))]
        return replay_main(argv)
    import signal
    import threading

    import redis

    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.processor import StreamProcessor

    client = redis.Redis.from_url(url)
    processor = StreamProcessor(client, RedisStreamsBus(client), consumer=args.consumer,
                                reclaim_idle_ms=args.reclaim_idle_ms, reclaim_every_s=args.reclaim_every_s)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = None
    if args.metrics_port is not None:
        try:
            server, _ = processor.metrics.serve(args.metrics_port)
        except OSError as exc:
            print(f"cannot serve metrics on 127.0.0.1:{args.metrics_port} ({exc}); pick another --metrics-port",
                  file=sys.stderr)
            return 2
        print(f"metrics on http://127.0.0.1:{server.server_port}/metrics", flush=True)
    print(f"stream processor {processor.consumer} consuming {url} (Ctrl-C stops)", flush=True)
    applied = processor.run(stop)
    p50, p99 = processor.lag_percentiles()
    print(f"applied {applied} events; event->online lag p50 {p50:.3f} s, p99 {p99:.3f} s; {dict(processor.stats)}")
    if server is not None:
        server.shutdown()
    client.close()
    return 0


def cmd_clean(args) -> int:
    from core.services import RedisServer, stop_pid

    state = _state(args)
    mixer_pid = state.run / "mixer.pid"
    if mixer_pid.exists():
        pid = int(mixer_pid.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.exists() and b"mixer.api" in cmdline.read_bytes():  # not a recycled pid
            stop_pid(pid)
    from serving.bento.server import BentoServer
    from serving.triton.server import TritonServer

    for server in (BentoServer.running(state), TritonServer.running(state), RedisServer.running(state)):
        if server is not None:
            server.stop()
    state.clean()
    print(f"removed {state.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="home-mixer", description=__doc__.splitlines()[0])
    p.add_argument("--state", help="state folder (default $HOME_MIXER_STATE or <checkout>/.state)")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job end to end on the real data")
    d.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="KuaiRand-Pure folder")
    d.add_argument("--users", type=int, nargs="*", help="user ids to show timelines for")
    d.add_argument("--n-users", type=int, default=3, help="how many users when --users is not given")
    d.add_argument("--keep-running", action="store_true", help="leave Redis and the mixer running")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("services", help="start/stop/status of the local Redis")
    s.add_argument("action", choices=["start", "stop", "status"])
    s.set_defaults(func=cmd_services)

    e = sub.add_parser("env", help="print shell exports for the feast/mlflow CLIs")
    e.set_defaults(func=cmd_env)

    f = sub.add_parser("features", help="offline features")
    fsub = f.add_subparsers(dest="action", required=True)
    fb = fsub.add_parser("build", help="validate, canonical tables, Spark features, feast apply, training set")
    fb.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    fb.add_argument("--log", nargs="*", help="impression log CSVs instead of the shared one")
    fb.add_argument("--materialize", action="store_true", help="also materialise into Redis")
    fb.set_defaults(func=cmd_features)
    fm = fsub.add_parser("materialize", help="fill the Redis online store")
    fm.set_defaults(func=cmd_materialize)

    t = sub.add_parser("train", help="train, log to MLflow, register and alias the rankers")
    t.add_argument("--model", choices=["light", "heavy", "both"], default="both")
    t.add_argument("--valid-days", type=int, default=2, help="validation days at the end of the log (1..2)")
    t.add_argument("--no-register", action="store_true", help="log the run only")
    t.add_argument("--no-promote", action="store_true",
                   help="register the new version without moving the champion alias (promote it later)")
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate the champions on an impression log")
    ev.add_argument("--log", required=True, help="impression log CSV (KuaiRand log schema)")
    ev.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="users/videos folder")
    ev.add_argument("--history", help="log whose events precede --log (default: the shared log)")
    ev.add_argument("--from-date", type=int, help="only evaluate rows with date >= this yyyymmdd")
    ev.add_argument("--out", help="JSON report path (default state/reports/evaluation.json)")
    ev.set_defaults(func=cmd_evaluate)

    m = sub.add_parser("models", help="registry operations")
    msub = m.add_subparsers(dest="action", required=True)
    pr = msub.add_parser("promote", help="point an alias at a registered version")
    pr.add_argument("--model", choices=["light", "heavy"], required=True)
    pr.add_argument("--version", type=int, required=True)
    pr.add_argument("--alias", default="champion")
    pr.set_defaults(func=cmd_promote)

    sv = sub.add_parser("serve", help="the mixer (foreground) and the model servers (background)")
    svsub = sv.add_subparsers(dest="service", required=True)
    from serving.bento.cli import add_commands as add_bentoml_commands
    from serving.triton.cli import add_commands as add_triton_commands

    add_bentoml_commands(svsub)
    add_triton_commands(sub, svsub)
    mx = svsub.add_parser("mixer", help="the mixer HTTP API")
    mx.add_argument("--config", help="mixer YAML (default: embedded mixer/mixer.yaml)")
    mx.add_argument("--host", default="127.0.0.1")
    mx.add_argument("--port", type=int, default=8080)
    mx.set_defaults(func=cmd_serve_mixer)

    st = sub.add_parser("stream", help="the real-time path: stream processor and log replay (Redis Streams)")
    st.add_argument("action", choices=["run", "replay"])
    st.add_argument("--log", help="replay: impression log CSV (default: the shared KuaiRand log)")
    st.add_argument("--speed", type=float, default=60.0, help="replay: log seconds per wall second (0 = max)")
    st.add_argument("--limit", type=int, help="replay: first N log rows only")
    st.add_argument("--start", help="replay: first log time, ISO 8601 with offset (inclusive)")
    st.add_argument("--end", help="replay: last log time, ISO 8601 with offset (exclusive)")
    st.add_argument("--time", choices=("live", "log"), default="live",
                    help="replay: stamp events with the wall clock at publish (live) or keep log times (log)")
    st.add_argument("--metrics-port", type=int, help="run: serve Prometheus /metrics on this port (0 = any free)")
    st.add_argument("--consumer", help="run: consumer name in the group (default <host>-<pid>)")
    st.add_argument("--reclaim-idle-ms", type=int, default=30_000,
                    help="run: take over entries another consumer left pending this long (ms)")
    st.add_argument("--reclaim-every-s", type=float, default=30.0,
                    help="run: look for entries orphaned by crashed consumers this often (s)")
    st.set_defaults(func=cmd_stream)

    c = sub.add_parser("clean", help="stop services and remove the state folder")
    c.set_defaults(func=cmd_clean)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.services import ServiceError

    try:
        return args.func(args)
    except (ServiceError, FileNotFoundError, UsageError) as exc:
        print(f"home-mixer: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # domain errors carry their own advice
        name = type(exc).__name__
        if name in {"DataValidationError", "RawDataMissingError", "RawDataParseError",
                    "RankerNotFoundError", "ConfigError", "MissingFeaturesError"}:
            print(f"home-mixer: {name}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
