"""``home-mixer`` command line: the demo, services, features, training, evaluation, serving, clean.

Every command works on one state folder (``--state`` or ``$HOME_MIXER_STATE``, default
``<checkout>/.state``) and prints a clear error, not a traceback, for a user's mistake.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.online_store import connect  # every client of the online store: redis:// or redis+sentinel://
from core.schema import HEAVY_RANKER_NAME, LIGHT_RANKER_NAME, TWO_TOWER_NAME
from core.state import DEFAULT_DATA_DIR, StateDir, state_from_cli


class UsageError(ValueError):
    """A command was called with arguments that cannot work; the message says what to change."""


def _state(args) -> StateDir:
    return state_from_cli(args.state)


def cmd_demo(args) -> int:
    from home_mixer.demo import run_demo

    return run_demo(_state(args), Path(args.data), users=args.users, n_users=args.n_users,
                    keep_running=args.keep_running)


# ---------------------------------------------------------------- services: start / stop / status, once
#
# Every service is a core.services.ManagedProcess subclass; one handler runs start|stop|status for
# all of them (`home-mixer services ...` is Redis, `home-mixer serve triton|bentoml|mixer ...` the
# others). A ServiceSpec says which class, how the flags configure an instance to start, and any
# extra step (Triton syncs its model repository from the registry before starting or reloading).


@dataclass(frozen=True)
class ServiceSpec:
    """How ``start|stop|status`` of one service map onto its supervisor class.

    Attributes:
        label: the name printed (``redis``, ``triton``, ``bentoml``, ``mixer``).
        server_class: () -> the ``ManagedProcess`` subclass (imported when the command runs).
        make: (state, args) -> the instance to start, configured from the flags.
        before_start: (state, args, running instance or None) -> None, run by ``start`` (and
            ``sync``) before anything else: Triton exports the registry's aliased versions into its
            repository and, if it runs, reloads the changed models.
        extra_actions: action name -> (state, args, running instance or None) -> exit code.
    """

    label: str
    server_class: Callable[[], type]
    make: Callable[[StateDir, argparse.Namespace], Any]
    before_start: Callable[[StateDir, argparse.Namespace, Any], None] | None = None
    extra_actions: dict[str, Callable[[StateDir, argparse.Namespace, Any], int]] = field(default_factory=dict)


def _print_status(label: str, status: dict) -> None:
    if not status["running"]:
        print(f"{label}: stopped")
        return
    print(f"{label}: running {status['address']} (pid {status['pid']}, "
          f"{'ready' if status['ready'] else 'not ready'}, log {status['log']})")
    for name, versions in (status.get("models") or {}).items():
        print(f"  {name}: ready versions {versions}")
    for t in status.get("targets") or []:  # Prometheus: what it scrapes, and the alerts pending or firing
        print(f"  target {t['job']} {t['url']}: {t['health']}" + (f" ({t['last_error']})" if t["last_error"] else ""))
    for a in status.get("alerts") or []:
        print(f"  alert {a['name']}: {a['state']}")
    if status.get("error"):
        print(f"  error: {status['error']}")


def run_service_action(spec: ServiceSpec, args: argparse.Namespace) -> int:
    """Run ``args.action`` (start, stop, status, or one of ``spec.extra_actions``) for one service.

    Prints one line per outcome (``status --json``: a JSON object). Returns the exit code: 0, or 1
    for ``status`` when the service is not running.

    Raises:
        core.services.ServiceError: start failed (the message has the end of the service's log).
    """
    state = _state(args)
    found = spec.server_class().find(state)
    if args.action in spec.extra_actions:
        return spec.extra_actions[args.action](state, args, found)
    if args.action == "stop":
        if found is not None:
            found.stop()
            print(f"{spec.label} stopped")
        else:
            print(f"{spec.label} is not running")
        return 0
    if args.action == "status":
        status = found.status() if found is not None else {"service": spec.label, "running": False, "ready": False}
        if args.json:
            print(json.dumps(status, indent=1, default=str))
        else:
            _print_status(spec.label, status)
        return 0 if status["running"] else 1
    if spec.before_start is not None:
        spec.before_start(state, args, found)
    if found is not None:
        print(f"{spec.label} already running: {found.address} (pid {found.pid})")
        return 0
    srv = spec.make(state, args).start(timeout_s=args.timeout)
    print(f"{spec.label} started: {srv.address} (pid {srv.pid}, log {srv.log_file}, "
          f"ready in {srv.started_seconds:.1f} s)")
    for name, versions in (srv.status_extra().get("models") or {}).items():
        print(f"  {name}: ready versions {versions}")
    return 0


def _redis_class():
    from core.services import RedisServer

    return RedisServer


def _triton_class():
    from serving.triton.server import TritonServer

    return TritonServer


def _bento_class():
    from serving.bento.server import BentoServer

    return BentoServer


def _mixer_class():
    from mixer.server import MixerServer

    return MixerServer


def _triton_models(state: StateDir) -> tuple[str, ...]:
    """What Triton serves: both rankers, and the two-tower's user tower once one is registered."""
    from models.registry import RankerNotFoundError, alias_version
    from serving.triton.repository import RANKERS

    try:
        alias_version(TWO_TOWER_NAME, tracking_uri=state.mlflow_tracking_uri)
    except RankerNotFoundError:
        return tuple(RANKERS)
    return (*RANKERS, TWO_TOWER_NAME)


def _triton_sync(state: StateDir, args, running) -> None:
    """Export the registry's aliased versions missing from the repository (the rankers, and the
    two-tower's user tower when registered); reload a running server."""
    from serving.export import validation_rows
    from serving.triton.repository import RANKERS, sync_repository, sync_user_tower
    from serving.triton.server import repository_dir
    from serving.user_tower_export import validation_sequences

    if running is None and args.action == "start":
        from serving.triton.install import TritonInstallation

        TritonInstallation.find()  # fail before exporting anything
    repo = running.repository if running is not None else repository_dir(state)
    report = sync_repository(state.mlflow_tracking_uri, repo, check_rows=lambda: validation_rows(state, n=args.rows))
    for name in _triton_models(state):
        if name not in RANKERS:
            report[name] = sync_user_tower(name, state.mlflow_tracking_uri, repo,
                                           check_sequences=lambda: validation_sequences(state, n=args.rows))
    for name, sync in report.items():
        aliases = ", ".join(f"{a}=v{v}" for a, v in sync.aliases.items())
        print(f"{name}: serving versions {list(sync.served)} ({aliases})")
        for e in sync.exported:
            print(f"  exported v{e.version} -> {e.path} (max |onnx - native| = {e.max_abs_diff:.1e} "
                  f"on {e.rows_checked} rows, {e.seconds:.1f} s)")
    if running is not None:
        for name, sync in report.items():
            if name not in running.models:
                print(f"{name}: synced; it loads when Triton starts again (`home-mixer serve triton stop`, then `start`)")
                continue
            if sync.changed or running.versions(name) != list(sync.served):
                print(f"{name}: reloaded, ready versions {running.load(name)}")
            else:
                print(f"{name}: unchanged, ready versions {list(sync.served)}")


def _triton_sync_action(state: StateDir, args, running) -> int:
    _triton_sync(state, args, running)
    if running is None:
        print("triton is not running: `home-mixer serve triton start` serves the synced repository")
    else:
        print(f"triton running: {running.address} (pid {running.pid})")
    return 0


def _prometheus_class():
    from monitoring.prometheus_server import PrometheusServer

    return PrometheusServer


def _prometheus_targets(state: StateDir, args, running) -> None:
    """Start the drift exporter if it is not running, then print what Prometheus scrapes (from the
    run records); a running Prometheus re-reads the refreshed targets."""
    from monitoring.exporter import DriftExporterServer

    exporter = DriftExporterServer.find(state)
    if exporter is None:
        exporter = DriftExporterServer(state).start()
        print(f"drift exporter started: {exporter.url}/metrics (pid {exporter.pid})")
    srv = running if running is not None else _prometheus_class()(state)
    targets = srv.write_targets() if running is not None else srv.targets()
    for job, found in targets.items():
        if job != "prometheus":
            print(f"  scrape {job}: {', '.join(t['address'] for t in found) or '(none recorded)'}")


def _make_mixer(state: StateDir, args):
    from home_mixer import jobs
    from mixer.server import MixerServer

    return MixerServer(state, host=args.host, port=args.port, config=Path(args.config) if args.config else None,
                       redis_url=jobs.redis_url_for(state), workers=_workers(args))


def _workers(args) -> int:
    """``--workers`` (default: one per core)."""
    from mixer.api import default_workers

    workers = getattr(args, "workers", None) or default_workers()
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    return workers


def _mixer_token_action(state: StateDir, args, found) -> int:
    """``serve mixer token``: print the bearer token clients of this state folder send (the first of
    ``$HOME_MIXER_API_TOKENS``, else ``<state>/run/mixer-api-token``, generated if missing)."""
    from mixer.auth import client_token

    print(client_token(state))
    return 0


SERVICES: dict[str, ServiceSpec] = {
    "redis": ServiceSpec("redis", _redis_class, lambda state, args: _redis_class()(state, port=args.port)),
    "triton": ServiceSpec("triton", _triton_class, lambda state, args: _triton_class()(state, models=_triton_models(state)),
                          before_start=_triton_sync, extra_actions={"sync": _triton_sync_action}),
    "bentoml": ServiceSpec("bentoml", _bento_class, lambda state, args: _bento_class()(state, port=args.port)),
    "mixer": ServiceSpec("mixer", _mixer_class, _make_mixer, extra_actions={"token": _mixer_token_action}),
    "prometheus": ServiceSpec("prometheus", _prometheus_class,
                              lambda state, args: _prometheus_class()(state, port=args.port,
                                                                      scrape_interval_s=args.scrape_interval),
                              before_start=_prometheus_targets),
}


def cmd_service(args) -> int:
    """``home-mixer services ...`` (Redis) and ``home-mixer serve triton|bentoml|mixer ...``."""
    if args.service_spec == "redis":
        return cmd_redis_services(args)
    return run_service_action(SERVICES[args.service_spec], args)


def cmd_redis_services(args) -> int:
    """``home-mixer services start [--ha | --cluster N] | stop | status``: the online store.

    ``start`` starts the single Redis (the embedded default); with ``--ha``, a primary, a replica
    and three Sentinels (``core.services.RedisHA``); with ``--cluster N``, a Redis Cluster of N
    primaries and N replicas (``core.services.RedisCluster``). ``stop`` and ``status`` cover
    whichever runs. Returns 0, or 1 for ``status`` when nothing runs.

    Raises:
        core.services.ServiceError: start failed, or another mode runs for the state folder.
    """
    from core.services import RedisCluster, RedisHA, RedisServer

    state = _state(args)
    ha = RedisHA.find(state)
    cluster = RedisCluster.find(state)
    single = RedisServer.find(state)
    if args.action == "start":
        if args.ha and args.cluster is not None:
            raise SystemExit("--ha and --cluster are two modes of the online store: choose one")
        if not args.ha and args.cluster is None:
            return run_service_action(SERVICES["redis"], args)
        if args.port is not None:
            raise SystemExit("--port is for the single Redis; --ha and --cluster record a port per process in "
                             "<state>/run")
        if args.cluster is not None:
            cluster = RedisCluster(state, shards=args.cluster).start(timeout_s=args.timeout)
            print(f"redis cluster started: {cluster.address} ({cluster.shards} primaries + {cluster.shards} "
                  f"replicas, ready in {cluster.started_seconds:.1f} s, logs in {cluster.log_file})")
            return 0
        ha = RedisHA(state).start(timeout_s=args.timeout)
        print(f"redis HA started: {ha.address} (primary 127.0.0.1:{ha.primary_port()}, "
              f"ready in {ha.started_seconds:.1f} s, logs in {ha.log_file})")
        return 0
    if args.action == "stop":
        if ha is None and single is None and cluster is None:
            print("redis is not running")
        if ha is not None:
            ha.stop()
            print("redis HA stopped (primary, replica, Sentinels)")
        if cluster is not None:
            cluster.stop()
            print(f"redis cluster stopped ({2 * cluster.shards} nodes)")
        if single is not None:
            single.stop()
            print("redis stopped")
        return 0
    statuses = ([ha.status()] if ha is not None else []) + ([cluster.status()] if cluster is not None else []) \
        + ([single.status()] if single is not None else [])
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses or
                         {"service": "redis", "running": False, "ready": False}, indent=1, default=str))
    elif not statuses:
        print("redis: stopped")
    for status in [] if args.json else statuses:
        if status["service"] == "redis-cluster":
            print(f"redis cluster: {status['address']} ({'ready' if status['ready'] else 'not ready'}), "
                  f"{status['shards']} primaries + {status['shards']} replicas")
            for m in status["members"]:
                _print_status(f"  {m['service']}", m)
                if m.get("role"):
                    print(f"    role: {'primary' if m['role'] == 'master' else 'replica'}, "
                          f"cluster_state {m.get('cluster_state')}")
            continue
        if status["service"] != "redis-ha":
            _print_status("redis", status)
            continue
        print(f"redis HA: {status['address']} ({'ready' if status['ready'] else 'not ready'}), "
              f"primary {status['primary']}")
        for m in status["members"]:
            _print_status(f"  {m['service']}", m)
            if m.get("role"):
                print(f"    role: {'primary' if m['role'] == 'master' else 'replica'}")
            elif m.get("primary"):
                print(f"    sees primary {m['primary']} with {m['replicas']} replica(s) and "
                      f"{m['other_sentinels']} other Sentinel(s)")
    return 0 if statuses else 1


def cmd_monitor_service(args) -> int:
    """``home-mixer monitor start|stop|status``: Prometheus and the drift exporter it scrapes."""
    code = run_service_action(SERVICES["prometheus"], args)
    if args.action == "stop":
        from monitoring.exporter import DriftExporterServer

        exporter = DriftExporterServer.find(_state(args))
        if exporter is not None:
            exporter.stop()
            print("drift exporter stopped")
    return code


def cmd_monitor_grafana(args) -> int:
    """``home-mixer monitor grafana``: the on-call Grafana dashboard JSON, checked against Grafana's schema."""
    from monitoring.dashboards.grafana import write_oncall_dashboard

    out = Path(args.out) if args.out else _state(args).reports / "grafana" / "home_mixer_oncall.json"
    path = write_oncall_dashboard(out)
    print(f"Grafana dashboard: {path}\nimport it in Grafana (Dashboards > New > Import) and pick a Prometheus "
          "data source; `home-mixer monitor status` prints this state's Prometheus address")
    return 0


def _add_service_parser(subparsers, name: str, spec: str, help_text: str, description: str,
                        actions: tuple[str, ...] = ("start", "stop", "status"), port: bool = False,
                        timeout: float | None = None, default_action: str | None = None):
    """One service's sub-command: ``action`` plus the flags every service has (``--timeout``,
    ``--json``) and optionally ``--port``."""
    sp = subparsers.add_parser(name, help=help_text, description=description)
    if default_action is None:
        sp.add_argument("action", choices=list(actions))
    else:
        sp.add_argument("action", nargs="?", choices=[default_action, *actions], default=default_action)
    sp.add_argument("--timeout", type=float, default=timeout,
                    help="start: seconds to wait for readiness (default: the service's)")
    sp.add_argument("--json", action="store_true", help="status: print a JSON object")
    if port:
        sp.add_argument("--port", type=int, default=None,
                        help="start: port on 127.0.0.1 (default: the one recorded in <state>/run, else a free one)")
    sp.set_defaults(func=cmd_service, service_spec=spec)
    return sp


def cmd_services(args) -> int:
    """``home-mixer services start|stop|status [redis|spark]``."""
    if args.engine == "redis":
        return cmd_service(args)
    from core.spark_services import SparkMaster, SparkWorker, start_spark_cluster, stop_spark_cluster

    state = _state(args)
    if args.action == "start":
        master, workers = start_spark_cluster(state, workers=args.workers, cores=args.worker_cores,
                                              memory=args.worker_memory, timeout_s=args.timeout)
        print(f"spark master {master.address} (pid {master.pid}); {len(workers)} workers "
              f"({', '.join(f'pid {w.pid}' for w in workers)})")
        print(f"batch jobs: home-mixer --spark-master {master.url} ...  (or --spark-master auto)")
        return 0
    if args.action == "stop":
        stopped = stop_spark_cluster(state)
        print(f"stopped {', '.join(stopped)}" if stopped else "no Spark cluster is running")
        return 0
    master = SparkMaster.find(state)
    status = master.status() if master is not None else {"service": "spark_master", "running": False, "ready": False}
    status["workers"] = [w.status() for w in (SparkWorker.find(state, index=i) for i in range(64)) if w is not None]
    if args.json:
        print(json.dumps(status, indent=1, default=str))
    else:
        _print_status("spark master", status)
        for w in status["workers"]:
            _print_status(w["service"], w)
    return 0 if status["running"] else 1


def _spark_master(state, value: str) -> str:
    """``--spark-master``: a master URL as given, or ``auto`` = this state's running standalone master.

    Raises:
        UsageError: ``auto`` without a running master, or a URL Spark does not take.
    """
    if value == "auto":
        from core.spark_services import SparkMaster

        master = SparkMaster.running(state)
        if master is None:
            raise UsageError("--spark-master auto: no Spark master is running for this state; "
                             "run `home-mixer services start spark` first")
        return master.url
    if not (value.startswith(("spark://", "local", "yarn", "k8s://"))):
        raise UsageError(f"--spark-master {value!r}: give spark://host:port, local[N], yarn, k8s://... or auto")
    return value


def cmd_env(args) -> int:
    from feature_repo.store import feast_env
    from home_mixer.jobs import redis_url_for

    state = _state(args)
    url = redis_url_for(state)
    print(f"export HOME_MIXER_STATE={state.root}")
    print(f"export HOME_MIXER_REDIS_URL={url}")
    for name, value in feast_env(state, url).items():  # feature_store.yaml's online store
        if name != "HOME_MIXER_STATE":
            print(f"export {name}={value}")
    print(f"export MLFLOW_TRACKING_URI={state.mlflow_tracking_uri}")
    print("export SPARK_LOCAL_IP=127.0.0.1")
    from core.spark_services import SparkMaster

    master = SparkMaster.running(state)
    if master is not None:
        print(f"export HOME_MIXER_SPARK_MASTER={master.url}")
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
    store = fs.open_store(state, url)
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


def _yaml_config(path: str | None, model, what: str):
    """A pydantic ``model`` from a YAML file (its defaults without one).

    Raises:
        UsageError: the file is unreadable, not YAML, or not valid for ``model`` (names ``what``).
    """
    if not path:
        return model()
    import pydantic
    import yaml

    try:
        return model.model_validate(yaml.safe_load(Path(path).read_text()) or {})
    except (OSError, yaml.YAMLError, pydantic.ValidationError) as exc:
        raise UsageError(f"{what} {path}: {exc}") from exc


def _gate_config(path: str | None):
    """The feature gate's tolerances from a YAML file (defaults without one)."""
    from monitoring.feature_validation import FeatureGateConfig

    return _yaml_config(path, FeatureGateConfig, "gate config")


def cmd_materialize(args) -> int:
    from feature_repo import store as fs
    from home_mixer import jobs

    state = _state(args)
    config = _gate_config(args.gate_config)
    store = fs.open_store(state, jobs.redis_url_for(state))  # Feast: redis or redis_sentinel
    from tqdm import tqdm

    with tqdm(unit="entity", unit_scale=True, desc="write Redis", disable=args.engine != "redis") as bar:
        start, end = jobs.materialize(store, state, validate=not args.no_validate, gate_config=config,
                                      engine=args.engine, progress=bar.update)
    print(f"materialised {start.isoformat()} .. {end.isoformat()} with engine {args.engine}"
          + (" (feature-table gate skipped)" if args.no_validate else " (feature tables passed the gate)"))
    return 0


def cmd_validate_features(args) -> int:
    """``home-mixer features validate``: the gate of ``materialize`` alone; exit 3 when it fails."""
    from home_mixer import jobs
    from monitoring.feature_validation import FeatureValidationError

    state = _state(args)
    try:
        gate = jobs.validate_features(state, _gate_config(args.gate_config))
    except FeatureValidationError as exc:
        print(exc, file=sys.stderr)
        return 3
    print(f"feature tables passed {len(gate.report.outcomes)} expectations "
          f"({', '.join(f'{t} {n:,}' for t, n in gate.report.rows.items())} rows)\n"
          f"  report {gate.report_path}\n  Data Docs {gate.data_docs}")
    return 0


def cmd_train(args) -> int:
    from home_mixer import jobs
    from models.split import split_by_days
    from models.train import format_ablation, train_heavy, train_light

    from core.schema import VALIDATION_DAYS

    state = _state(args)
    if args.model == "two_tower":
        from models.train import train_two_tower

        res = train_two_tower(state, register=not args.no_register, set_champion=not args.no_promote)
        print(f"two_tower: run {res.run_id} version {res.model_version}")
        print(json.dumps(res.metrics, indent=1, default=float))
        return 0
    if not 1 <= args.valid_days <= VALIDATION_DAYS:
        raise UsageError(f"--valid-days must be 1..{VALIDATION_DAYS}: the feature smoothing priors were "
                         f"computed with the last {VALIDATION_DAYS} days held out, so validating on more "
                         "days would leak their labels into the features")
    if args.from_logged:
        frame = _logged_training_set(state, args.label_window_s)
    else:
        frame = jobs.load_training_set(state)
    train, valid = split_by_days(frame, valid_days=args.valid_days)
    results = {}
    if args.model in ("light", "both") and args.light_on == "impressions":
        results["light_ranker"] = train_light(train, valid, state, register=not args.no_register,
                                              set_champion=not args.no_promote,
                                              **_continued_light(state, args.continue_from))
    if args.model in ("heavy", "both"):
        results["heavy_ranker"] = heavy = train_heavy(train, valid, state, register=not args.no_register,
                                                      set_champion=not args.no_promote, ablation=args.ablation)
        # drift is measured against the champion's training window: it travels with the version
        from home_mixer.drift_job import profile_training_window

        profile_training_window(state, heavy.run_id, train, heavy.model)
    if args.model in ("light", "both") and args.light_on == "candidates":
        results["light_ranker"] = _train_light_on_candidates(state, valid, args)
    for name, res in results.items():
        print(f"{name}: run {res.run_id} version {res.model_version}")
        print(json.dumps(res.metrics, indent=1, default=float))
        if res.ablation is not None:
            print(format_ablation(res.ablation))
    return 0


def _drift_gate_config(path: str | None):
    """The drift gate's thresholds from a YAML file (defaults without one)."""
    from monitoring.drift import DriftGateConfig

    return _yaml_config(path, DriftGateConfig, "drift gate config")


def cmd_monitor_drift(args) -> int:
    from home_mixer.drift_job import run_drift
    from monitoring.reference import ReferenceNotFoundError

    state = _state(args)
    gate = _drift_gate_config(args.gate_config)
    try:
        run = run_drift(state, window=args.window, against=args.against,
                        log=Path(args.log) if args.log else None, data_dir=Path(args.data),
                        method=args.method, max_drift_share=args.max_drift_share,
                        out_dir=Path(args.out) if args.out else None, gate=gate)
    except (ValueError, ReferenceNotFoundError) as e:
        raise UsageError(str(e)) from None
    print(run.summary.to_text())
    print(f"report: {run.html}\nsummary: {run.json}" + (f"\ndashboard: {run.dashboard}" if run.dashboard else ""))
    # non-zero when the gate fails, so a scheduler or CI can act on it
    return 0 if run.summary.passed else 3


def cmd_experiment_report(args) -> int:
    """``home-mixer experiment report [EXP]``: the readout of an experiment (exit 4 on SRM or a
    guardrail breach)."""
    from home_mixer.experiment_job import EXIT_FAILED, readout_text, report_experiment
    from mixer.config import ConfigError
    from monitoring.experiment_report import ExperimentDataError

    try:
        rep = report_experiment(_state(args), args.experiment, config=Path(args.config) if args.config else None,
                                impressions=Path(args.impressions) if args.impressions else None,
                                control=args.control, window_s=args.window_s,
                                out_dir=Path(args.out) if args.out else None, max_p99_ratio=args.max_p99_ratio,
                                max_share_increase=args.max_share_increase)
    except (ExperimentDataError, ConfigError) as e:
        raise UsageError(str(e)) from None
    print(readout_text(rep.result))
    print(f"report: {rep.html}\nsummary: {rep.json}")
    return 0 if rep.result.passed else EXIT_FAILED


def cmd_experiment_simulate(args) -> int:
    """``home-mixer experiment simulate``: simulated users against a mixer started with the
    experiment's config, then the readout (exit 4 on SRM or a guardrail breach)."""
    from tqdm import tqdm

    from core.services import ServiceError
    from home_mixer.experiment_job import EXIT_FAILED, readout_text, simulate_experiment
    from mixer.config import ConfigError
    from monitoring.experiment_report import ExperimentDataError

    if args.users < 2 or args.sessions < 1:
        raise UsageError("--users must be >= 2 and --sessions >= 1")
    bar = tqdm(total=args.users * args.sessions, desc="simulated requests", unit="req", mininterval=2)

    def progress(done, total):
        bar.update(done - bar.n)

    try:
        run = simulate_experiment(_state(args), config=Path(args.config) if args.config else None, users=args.users,
                                  sessions=args.sessions, seed=args.seed, data_dir=Path(args.data),
                                  workers=args.workers, progress=progress)
    except (ExperimentDataError, ConfigError, ServiceError) as e:
        raise UsageError(str(e)) from None
    finally:
        bar.close()
    print(readout_text(run.report.result))
    print(f"report: {run.report.html}\nsummary: {run.report.json}")
    return 0 if run.report.result.passed else EXIT_FAILED


def cmd_experiment_ope(args) -> int:
    """``home-mixer experiment ope``: off-policy estimates of the config's arms (greedy, or a
    softmax at --temperature) from an exploring arm's logged pages; --simulate checks them against
    simulated users' true values."""
    import json

    from tqdm import tqdm

    from core.services import ServiceError
    from home_mixer.experiment_job import evaluate_off_policy, off_policy_text, simulate_off_policy
    from mixer.config import ConfigError
    from monitoring.experiment_report import ExperimentDataError
    from monitoring.ope_report import OffPolicyDataError

    weights = None
    if args.weights:
        try:
            weights = {str(k): float(v) for k, v in json.loads(args.weights).items()}
        except (ValueError, AttributeError) as e:
            raise UsageError(f"--weights must be a JSON object of head -> weight, e.g. '{{\"click\": 1}}': {e}") from None
    config = Path(args.config) if args.config else None
    try:
        if args.simulate:
            if args.users < 2:
                raise UsageError("--users must be >= 2")
            bar = tqdm(total=args.users * args.sessions, desc="simulated requests", unit="req", mininterval=2)
            try:
                rows = simulate_off_policy(_state(args), config=config, users=args.users, sessions=args.sessions,
                                           seed=args.seed, head=args.head, temperature=args.temperature,
                                           weights=weights, data_dir=Path(args.data), workers=args.workers,
                                           progress=lambda done, total: bar.update(done - bar.n))
            finally:
                bar.close()
        else:
            rows = evaluate_off_policy(_state(args), config=config, arm=args.arm, head=args.head,
                                       temperature=args.temperature, weights=weights,
                                       impressions=Path(args.impressions) if args.impressions else None)
    except (ExperimentDataError, OffPolicyDataError, ConfigError, ServiceError, ValueError) as e:
        raise UsageError(str(e)) from None
    print(off_policy_text(rows, args.head))
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in rows], indent=2))
        print(f"written: {args.json}")
    return 0


def cmd_loop_run(args) -> int:
    """``home-mixer loop run``: the model updater (home_mixer/loop.py): waits for a trigger, then
    trains a challenger from the feature log, shadows and ramps it through the mixer's config, and
    promotes or rolls it back; --once runs one cycle now."""
    from pydantic import ValidationError

    from core.online_store import connect
    from home_mixer import jobs
    from home_mixer.loop import ModelUpdater, load_loop_settings
    from models.registry import RankerNotFoundError
    from pipelines.logged_features import EmptyFeatureLogError

    try:
        settings = load_loop_settings(Path(args.config) if args.config else None)
    except (ValueError, ValidationError, OSError) as e:
        raise UsageError(f"loop settings: {e}") from None
    mixer_config = Path(args.mixer_config)
    if not mixer_config.exists():
        raise UsageError(f"{mixer_config} does not exist: pass the YAML file the mixers were started with")
    state = _state(args)
    if not state.table("impressions").exists():
        raise UsageError(f"{state.table('impressions')} does not exist: the feature log is labelled from the "
                         "impressions table (`home-mixer features build`)")
    client = connect(jobs.redis_url_for(state))
    updater = ModelUpdater(state, mixer_config, settings, client)
    try:
        while True:
            trigger = "forced" if args.once else updater.trigger()
            if trigger is not None:
                d = updater.run_cycle(trigger)
                print(f"{d.decision}: heavy_ranker v{d.challenger_version} (champion was v{d.champion_version}); "
                      f"{d.reason}; MLflow run {d.run_id}", flush=True)
            if args.once:
                return 0
            time.sleep(args.poll_s)
    except (EmptyFeatureLogError, RankerNotFoundError) as e:
        raise UsageError(str(e)) from None
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def cmd_monitor_dashboard(args) -> int:
    """``home-mixer monitor dashboard``: the static drift page of every run in <state>/reports/drift."""
    from monitoring.drift import RUNS_DIR
    from monitoring.dashboards.drift_page import write_drift_dashboard

    try:
        page = write_drift_dashboard(_state(args).reports / RUNS_DIR, Path(args.out) if args.out else None)
    except NotADirectoryError as e:
        raise UsageError(str(e)) from None
    print(f"drift dashboard: {page}\nopen: {page.resolve().as_uri()}")
    return 0


def _train_light_on_candidates(state, valid, args):
    """``--light-on candidates``: the candidate-set training rows, then the light ranker on them.

    Raises:
        UsageError: Redis is not running or no champions exist to build the pipeline with.
    """
    from mlflow.exceptions import MlflowException

    from home_mixer.candidate_training import candidate_training_set
    from models.train import train_light_on_candidates

    if args.candidate_users < 1:
        raise UsageError("--candidate-users must be >= 1")
    try:
        cts = candidate_training_set(state, valid_days=args.valid_days, n_users=args.candidate_users)
    except RuntimeError as exc:
        raise UsageError(f"{exc}") from exc
    except MlflowException as exc:
        raise UsageError("--light-on candidates runs the mixer's pipeline, which needs registered champions: "
                         f"train both rankers on impressions first (`home-mixer train`). MLflow said: {exc}") from exc
    return train_light_on_candidates(cts.frame, valid, state, register=not args.no_register,
                                     set_champion=not args.no_promote, context=cts.run_context())


def _continued_light(state, ref: str | None) -> dict:
    """``--continue-from REF``: ``train_light``'s arguments for an incremental update of the light
    ranker version REF names (an alias or a version): its booster and its feature names."""
    if not ref:
        return {}
    from core.schema import LIGHT_RANKER_NAME
    from models.registry import RankerNotFoundError, load_ranker_version, resolve_model_ref

    uri = state.mlflow_tracking_uri
    try:
        version = resolve_model_ref(LIGHT_RANKER_NAME, ref, uri)
        handle = load_ranker_version(LIGHT_RANKER_NAME, version, uri)
    except (RankerNotFoundError, ValueError) as e:
        raise UsageError(f"--continue-from {ref}: {e}") from None
    print(f"continuing light_ranker v{version} ({handle.model.num_trees()} trees) on the new rows")
    return {"continue_from": (version, handle.model), "feature_names": tuple(handle.feature_names)}


def _logged_training_set(state, window_s: float):
    """``--from-logged``: the mixer's feature log (Redis) labelled from the state's impressions table.

    Raises:
        UsageError: no impressions table, an empty feature log, or no labelled serve.
    """
    import pandas as pd

    from home_mixer import jobs
    from pipelines.logged_features import EmptyFeatureLogError, logged_training_set

    path = state.table("impressions")
    if not path.exists():
        raise UsageError(f"{path} does not exist: the labels come from the impressions table; run "
                         "`home-mixer features build` first")
    client = connect(jobs.redis_url_for(state))
    try:
        frame = logged_training_set(client, pd.read_parquet(path), window_s=window_s)
    except EmptyFeatureLogError as e:
        raise UsageError(str(e)) from None
    finally:
        client.close()
    print(f"training from {len(frame)} logged serves with labels ({frame['request_id'].nunique()} requests)")
    return frame


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def cmd_whole_funnel(args, state) -> None:
    """``evaluate --whole-funnel``: the whole-funnel evaluation of the state's validation days."""
    from core.services import RedisServer
    from home_mixer.whole_funnel import WHOLE_FUNNEL_REPORT, log_to_mlflow, whole_funnel

    if args.whole_funnel_users < 0:
        raise UsageError("--whole-funnel-users must be >= 0 (0 = every user with positives)")
    if RedisServer.running(state) is None:  # checked before the long evaluation, not after it
        raise UsageError(f"--whole-funnel needs the Redis of {state.root} (the as-of store is built in its "
                         "database 9): start it with `home-mixer services start`")
    report = whole_funnel(state, n_users=args.whole_funnel_users or None, seed=args.funnel_seed,
                          valid_days=args.valid_days)
    path = report.to_json(state.reports / WHOLE_FUNNEL_REPORT)
    run_id = log_to_mlflow(state, report, path)
    for kind in report.orders:
        print(report.to_table(kind))
        print()
    print(f"report {path}; MLflow run {run_id}")


def cmd_evaluate(args) -> int:
    from home_mixer.evaluation import evaluate_log

    state = _state(args)
    if not args.log and not args.whole_funnel:
        raise UsageError("give --log PATH (evaluate inside logged requests), --whole-funnel, or both")
    if args.whole_funnel:
        cmd_whole_funnel(args, state)
        if not args.log:
            return 0
    if args.funnel_users < 0 or args.funnel_light_k < 1 or args.funnel_heavy_k < 1:
        raise UsageError("--funnel-users must be >= 0, --funnel-light-k and --funnel-heavy-k >= 1")
    if args.funnel_users:
        from core.services import RedisServer

        if RedisServer.running(state) is None:  # checked before the long evaluation, not after it
            raise UsageError(f"--funnel-users needs the Redis of {state.root} (online features, candidate "
                             "index): start it with `home-mixer services start`")
    out = Path(args.out) if args.out else state.reports / "evaluation.json"
    report = evaluate_log(state, Path(args.log), data_dir=Path(args.data),
                          history=Path(args.history) if args.history else None,
                          from_date=args.from_date, out=out,
                          gap_s=args.request_gap_min * 60.0)
    print(report.to_table())
    if args.funnel_users:
        from home_mixer.evaluation import add_funnel_to_report, funnel_recall, validation_users

        users = validation_users(state, args.funnel_users, seed=args.funnel_seed)
        try:
            funnel = funnel_recall(state, users, light_k=args.funnel_light_k, heavy_k=args.funnel_heavy_k,
                                   seed=args.funnel_seed)
        except RuntimeError as e:  # the state's Redis is not running
            raise UsageError(f"{e} (the funnel runs the mixer's candidate generation on the state's online "
                             "store and candidate index)") from None
        print(funnel.to_line())
        add_funnel_to_report(out, funnel)
    return 0


def cmd_index_build(args) -> int:
    from home_mixer import jobs
    from pipelines.candidate_index import CanonicalTables, build_candidate_index, build_coengagement
    from pipelines.spark import spark_session

    state = _state(args)
    url = jobs.redis_url_for(state)
    as_of = pd_timestamp(args.as_of) if args.as_of else jobs.log_end(state)
    tables = CanonicalTables.load(state)
    neighbours = None
    if not args.no_coengagement:
        neighbours = build_coengagement(spark_session("home-mixer-index"), tables, as_of, window=args.window,
                                        top_n=args.neighbours)
    counts = build_candidate_index(state, url, as_of, tables=tables, coengagement=neighbours,
                                   sequence_length=args.sequence_length)
    print(f"candidate index as of {as_of}: {counts}")
    if args.ann != "off":
        from models.registry import RankerNotFoundError
        from models.train import refresh_two_tower_index

        try:  # the learned-retrieval index over the same catalogue, with the champion's towers
            refresh_two_tower_index(state, as_of, index_kind=args.ann_kind, set_champion=not args.no_promote)
        except RankerNotFoundError as e:
            if args.ann == "on":
                raise UsageError(f"--ann on: {e}") from None
            print("ANN index skipped: no two_tower champion yet (`home-mixer train --model two_tower` trains one "
                  "with its index)")
    return 0


def pd_timestamp(text: str):
    """An ISO instant as a UTC pandas Timestamp (naive = UTC).

    Raises:
        UsageError: not a time.
    """
    import pandas as pd

    try:
        ts = pd.Timestamp(text)
    except ValueError as e:
        raise UsageError(f"--as-of {text!r} is not an ISO-8601 time: {e}") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def cmd_promote(args) -> int:
    from models.registry import promote

    import time

    from models.registry import alias_version, RankerNotFoundError
    from serving.triton.server import TritonServer

    state = _state(args)
    uri = state.mlflow_tracking_uri
    name = MODEL_NAMES[args.model]
    try:
        previous = alias_version(name, args.alias, tracking_uri=uri)
    except RankerNotFoundError:
        previous = None
    # the gate compares rankers inside requests; the two-tower retrieves (held-out recall in its runs)
    check = None if name == TWO_TOWER_NAME else _promotion_check(state, name, args.version, args.alias, args.force)
    if check is not None and not check.passed and not args.force:
        print(f"home-mixer: refused: {name} v{args.version} ranks worse than v{check.champion_version} "
              f"(@{args.alias}) inside requests on the validation days: request GAUC "
              f"{check.describe(check.blocking_heads)}; {args.alias} stays on v{check.champion_version}. "
              f"Pass --force to promote anyway (e.g. an emergency rollback).", file=sys.stderr)
        return 1
    started = time.monotonic()
    promote(name, args.version, alias=args.alias, tracking_uri=uri)
    print(f"{name}@{args.alias} -> version {args.version}")
    if check is not None and check.blocking_heads:
        print(f"forced: v{args.version} is worse than v{check.champion_version} on "
              f"{check.describe(check.blocking_heads)}")
    triton = TritonServer.running(state)
    if triton is not None and name in triton.models:  # export the version if new, then (re)load it: no restart
        from serving.export import validation_rows
        from serving.triton.repository import RANKERS, sync_repository, sync_user_tower
        from serving.user_tower_export import validation_sequences

        try:
            if name in RANKERS:
                sync_repository(uri, triton.repo_dir, check_rows=lambda: validation_rows(state, n=2000),
                                models=(name,))
            else:  # the two-tower: Triton serves its user tower
                sync_user_tower(name, uri, triton.repo_dir, check_sequences=lambda: validation_sequences(state))
            print(f"triton: {name} ready versions {triton.load(name)} "
                  f"({time.monotonic() - started:.1f} s after promote)")
        except Exception as exc:  # the alias must not point at a version the servers cannot serve
            if previous is not None:
                promote(name, previous, alias=args.alias, tracking_uri=uri)
            raise UsageError(f"Triton could not serve {name} v{args.version} ({type(exc).__name__}: {exc}); "
                             f"{args.alias} moved back to v{previous}") from exc
    print("mixers pick the new version up within models.reload_interval_s (default 5 s), no restart")
    return 0


def _promotion_check(state: StateDir, name: str, version: int, alias: str, force: bool):
    """The promotion gate of ``models promote`` (``models.promotion``): compare ``version`` with the
    version ``alias`` points at on the training set's validation days and print the table.

    Returns the ``PromotionCheck``, or None when no check is needed (no current version, same
    version) or when ``force`` is set and there is no training set to check on.

    Raises:
        UsageError: no training set in the state (and not ``force``).
        RankerNotFoundError: the registered model or ``version`` does not exist.
    """
    from models.promotion import TrainingSetMissingError, compare_versions, validation_frame, version_to_beat

    uri = state.mlflow_tracking_uri
    champion = version_to_beat(name, version, alias, tracking_uri=uri)
    if champion is None:
        return None
    try:
        frame = validation_frame(state)
    except TrainingSetMissingError as exc:
        if force:
            print(f"warning: --force without the promotion check: {exc}", file=sys.stderr)
            return None
        raise UsageError(f"cannot check {name} v{version} against v{champion} (@{alias}): {exc}, "
                         "or pass --force to promote without the check") from None
    check = compare_versions(name, champion, version, frame, tracking_uri=uri)
    print(check.to_table())
    return check


def _print_front_door(status: dict) -> None:
    if not status["running"]:
        print(f"mixer front door: HAProxy stopped ({sum(r['running'] for r in status['replicas'])} of "
              f"{len(status['replicas'])} replicas still running: `home-mixer serve mixer stop` stops them)")
    else:
        print(f"mixer front door: {status['url']} (HAProxy pid {status['pid']}; metrics {status['metrics']}, "
              f"stats {status['stats']}; config {status['config']}; log {status['log']})")
    for r in status["replicas"]:
        where = f"{r['url']} (pid {r['pid']})" if r["running"] else "not running"
        seen = f", HAProxy: {r['haproxy']} (last check {r['check'] or '-'})" if "haproxy" in r else ""
        print(f"  replica {r['name']}: {where}{seen}")


def _serve_front_door(args) -> int:
    """``serve mixer --replicas N [run|start]``: N mixer replicas behind HAProxy
    (``mixer.front_door.MixerFrontDoor``); ``run`` stays in the foreground until Ctrl-C or SIGTERM,
    then stops them."""
    from home_mixer import jobs
    from mixer.front_door import MixerFrontDoor

    if args.replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {args.replicas}")
    if args.workers not in (None, 1):
        raise UsageError("--workers does not combine with --replicas: each replica is one process behind "
                         "HAProxy; ask for more replicas instead")
    state = _state(args)
    if args.action in ("stop", "status", "token"):
        return cmd_serve_mixer(argparse.Namespace(**{**vars(args), "replicas": None}))
    found = MixerFrontDoor.find(state)
    if found is not None:
        print("mixer front door already running:")
        _print_front_door(found.status())
        return 0
    door = MixerFrontDoor(state, replicas=args.replicas, host=args.host,
                          port=args.port or (8080 if args.action == "run" else None),
                          config=Path(args.config) if args.config else None, redis_url=jobs.redis_url_for(state))
    stop = _stop_on_signals() if args.action == "run" else None
    door.start(timeout_s=args.timeout)
    print(f"mixer front door started: {args.replicas} replicas behind HAProxy")
    _print_front_door(door.status())
    if stop is None:
        return 0
    print("Ctrl-C stops HAProxy and the replicas", flush=True)
    try:
        stop.wait()
    finally:
        door.stop()
        print("mixer front door stopped")
    return 0


def cmd_serve_mixer(args) -> int:
    """``serve mixer`` (no action, or ``run``): the mixer in the foreground; ``start|stop|status``:
    a supervised background mixer (:func:`run_service_action`). With ``--replicas N``: N replicas
    behind HAProxy (:func:`_serve_front_door`); ``stop`` and ``status`` cover a front door too."""
    if getattr(args, "replicas", None) is not None:
        return _serve_front_door(args)
    if args.action in ("stop", "status"):
        from mixer.front_door import MixerFrontDoor

        door = MixerFrontDoor.find(_state(args))
        if door is not None:
            if args.action == "stop":
                door.stop()
                print(f"mixer front door stopped (HAProxy and {door.replicas} replicas)")
                if _mixer_class().find(_state(args)) is None:
                    return 0
            elif args.json:
                print(json.dumps(door.status(), indent=1, default=str))
                return 0
            else:
                status = door.status()
                _print_front_door(status)
                return 0 if status["running"] else 1
    if args.action != "run":
        return run_service_action(SERVICES["mixer"], args)
    from home_mixer import jobs
    from mixer.api import main as serve_main

    state = _state(args)
    argv = ["--host", args.host, "--port", str(args.port or 8080), "--redis-url", jobs.redis_url_for(state),
            "--workers", str(_workers(args))]
    if args.config:
        argv += ["--config", args.config]
    os.environ.setdefault("MLFLOW_TRACKING_URI", state.mlflow_tracking_uri)
    serve_main(argv)
    return 0


MODEL_NAMES = {"light": LIGHT_RANKER_NAME, "heavy": HEAVY_RANKER_NAME, "two_tower": TWO_TOWER_NAME}


def cmd_export(args) -> int:
    """Export one registered ranker, or the two-tower's user tower, (by alias) to ONNX, checked
    against the native model (the rankers on validation rows, the user tower on real sequences)."""
    import time

    from models.registry import alias_version
    from serving.export import export_version, validation_rows

    state = _state(args)
    started = time.monotonic()
    name, uri = MODEL_NAMES[args.model], state.mlflow_tracking_uri
    version = alias_version(name, args.alias, uri)  # once: the folder is named by this version
    out = Path(args.out) if args.out else state.root / "onnx" / name / str(version)
    if args.model == "two_tower":
        from serving.user_tower_export import export_user_tower_version, validation_sequences

        res = export_user_tower_version(name, version, uri, out, validation_sequences(state, n=args.rows),
                                        alias=args.alias)
        shapes, checked = f"user tower {list(res.feature_names)} [batch, L] -> user_embedding [batch, D]", "sequences"
    else:
        res = export_version(name, version, uri, out, validation_rows(state, n=args.rows), alias=args.alias)
        shapes = f"features [batch, {len(res.feature_names)}] -> probabilities [batch, {len(res.heads)}] {list(res.heads)}"
        checked = "validation rows"
    print(f"{res.name}@{args.alias} = v{res.version} (run {res.run_id}) -> {res.path}")
    print(f"  {shapes}")
    print(f"  max |onnx - native| = {res.max_abs_diff:.2e} on {res.rows_checked} {checked}; "
          f"{time.monotonic() - started:.1f} s")
    return 0


def _stop_on_signals():
    """A ``threading.Event`` that SIGINT and SIGTERM set: a foreground service stops cleanly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve_metrics(serve: Callable[[], tuple], port: int | None):
    """Start a ``/metrics`` server with ``serve()`` when ``port`` is set (0 = any free port); returns
    it (``None`` without a port).

    Raises:
        UsageError: the port is taken.
    """
    if port is None:
        return None
    try:
        server, _ = serve()
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on 127.0.0.1:{port} ({exc}); pick another --metrics-port") from None
    print(f"metrics on http://127.0.0.1:{server.server_port}/metrics", flush=True)
    return server


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

    from pipelines.graph.config import load_fanout_config
    from pipelines.graph.writer import SocialGraphWriter
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.metrics import forget_metrics_endpoint, record_name
    from pipelines.streaming.processor import StreamProcessor

    client = connect(url)
    # the social graph (followers / followees, follow backfill) is kept beside the real-time features
    processor = StreamProcessor(client, RedisStreamsBus(client), consumer=args.consumer,
                                reclaim_idle_ms=args.reclaim_idle_ms, reclaim_every_s=args.reclaim_every_s,
                                graph=SocialGraphWriter(client, load_fanout_config(args.fanout_config)))
    stop = _stop_on_signals()
    # recorded in <state>/run so `home-mixer monitor start` scrapes it
    server = _serve_metrics(lambda: processor.metrics.serve(args.metrics_port, state=state,
                                                            name=record_name(processor.consumer)), args.metrics_port)
    print(f"stream processor {processor.consumer} consuming {url} (Ctrl-C stops)", flush=True)
    applied = processor.run(stop)
    p50, p99 = processor.lag_percentiles()
    print(f"applied {applied} events; event->online lag p50 {p50:.3f} s, p99 {p99:.3f} s; {dict(processor.stats)}")
    if server is not None:
        server.shutdown()
        forget_metrics_endpoint(state, record_name(processor.consumer))
    client.close()
    return 0


def cmd_graph(args) -> int:
    """``graph load PATH`` / ``graph generate`` / ``graph kuairand``: the follow graph into Redis
    (both directions) and the canonical ``follow_graph`` table; ``graph export``: that table from
    what Redis holds now (streamed edge changes included)."""
    import numpy as np
    from tqdm import tqdm

    from home_mixer import jobs
    from pipelines.graph.edges import read_edge_list, write_edge_list, write_follow_graph
    from pipelines.graph.store import SocialGraphStore

    state = _state(args)
    if args.action == "export":
        client = connect(jobs.redis_url_for(state))
        follower, followee = SocialGraphStore(client).snapshot()
        client.close()
        path = write_follow_graph(state, follower, followee, "redis-snapshot")
        print(f"canonical table {path}: {follower.size:,} follow edges as Redis holds them now")
        return 0
    if args.action == "load":
        path = Path(args.path)
        if not path.exists():
            raise UsageError(f"edge list {path} not found; give a SNAP file ('follower followee' per line)")
        with tqdm(total=path.stat().st_size if path.suffix != ".gz" else None, unit="B", unit_scale=True,
                  desc=f"read {path.name}", disable=args.quiet) as bar:
            follower, followee = read_edge_list(path, progress=bar.update)
        source = f"snap:{path.name}"
    elif args.action == "generate":
        from pipelines.graph.generator import generate_follow_graph

        if args.users < 2 or args.mean_followees <= 0:
            raise UsageError("need --users >= 2 and --mean-followees > 0")
        graph = generate_follow_graph(args.users, args.mean_followees, seed=args.seed)
        print(graph.describe(), flush=True)
        follower, followee = graph.follower, graph.followee
        source = f"generated:users={args.users},mean_followees={args.mean_followees},seed={args.seed}"
        if args.out:
            write_edge_list(args.out, follower, followee, header=f"home-mixer graph generate: {graph.describe()}")
            print(f"wrote {args.out}")
    else:  # kuairand
        import pandas as pd

        from pipelines.graph.kuairand import kuairand_follow_graph

        table = state.table("social_edges")
        if not table.exists():
            raise UsageError(f"{table} not found: build the canonical tables first (home-mixer features build)")
        edges = kuairand_follow_graph(pd.read_parquet(table), min_weight=args.min_weight)
        follower, followee = edges["user_id"].to_numpy(np.int64), edges["author_id"].to_numpy(np.int64)
        print(f"KuaiRand graph: {len(edges):,} edges ({int((edges['kind'] == 'follow').sum())} explicit follows)")
        source = "kuairand"
    print(f"canonical table {write_follow_graph(state, follower, followee, source)}")
    if args.no_load:
        return 0
    client = connect(jobs.redis_url_for(state))
    store = SocialGraphStore(client)
    with tqdm(total=2 * int((follower != followee).sum()), unit="member", unit_scale=True,
              desc="load into Redis", disable=args.quiet) as bar:
        n = store.load_edges(follower, followee, progress=bar.update)
    print(f"loaded {n:,} follow edges (followers and followees) into {jobs.redis_url_for(state)}")
    client.close()
    return 0


def cmd_fanout(args) -> int:
    """``fanout run``: fan-out workers (one consumer each of the post topic's group) until Ctrl-C."""
    import signal
    import subprocess

    from pipelines.graph.config import load_fanout_config

    state = _state(args)
    overrides = {k: v for k, v in (("reclaim_idle_ms", args.reclaim_idle_ms),
                                   ("page_pause_ms", args.page_pause_ms)) if v is not None}
    settings = load_fanout_config(args.config, **overrides)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.workers > 1:
        # one process per worker (a worker is I/O-bound on one Redis connection; processes use the cores)
        base = args.consumer or f"fanout-{os.getpid()}"
        procs = []
        for i in range(args.workers):
            argv = [sys.executable, "-m", "home_mixer.cli", "--state", str(state.root), "fanout", "run",
                    "--workers", "1", "--consumer", f"{base}-{i}"]
            for flag, value in (("--config", args.config), ("--reclaim-idle-ms", args.reclaim_idle_ms),
                                ("--page-pause-ms", args.page_pause_ms)):
                if value is not None:
                    argv += [flag, str(value)]
            if args.metrics_port is not None:
                argv += ["--metrics-port", str(args.metrics_port + i if args.metrics_port else 0)]
            procs.append(subprocess.Popen(argv))
        stop = lambda *_: [p.send_signal(signal.SIGTERM) for p in procs if p.poll() is None]  # noqa: E731
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        print(f"{args.workers} fan-out workers: pids {[p.pid for p in procs]} (Ctrl-C stops)", flush=True)
        codes = [p.wait() for p in procs]
        return max(codes)

    from home_mixer import jobs
    from pipelines.graph.fanout import FanoutWorker
    from pipelines.graph.metrics import record_name
    from pipelines.streaming.bus import RedisStreamsBus
    from pipelines.streaming.metrics import forget_metrics_endpoint

    url = jobs.redis_url_for(state)
    client = connect(url)
    worker = FanoutWorker(client, RedisStreamsBus(client), settings, consumer=args.consumer)
    stop_event = _stop_on_signals()
    server = _serve_metrics(lambda: worker.metrics.serve(args.metrics_port, state=state, consumer=worker.consumer),
                            args.metrics_port)
    print(f"fan-out worker {worker.consumer} consuming {settings.post_topic} / {settings.group} on {url} "
          f"(celebrity threshold {settings.celebrity_threshold:,}; Ctrl-C stops)", flush=True)
    handled = worker.run(stop_event)
    print(f"fan-out worker {worker.consumer}: {handled} posts; {dict(worker.stats)}", flush=True)
    if server is not None:
        server.shutdown()
        forget_metrics_endpoint(state, record_name(worker.consumer))
    client.close()
    return 0


def cmd_clean(args) -> int:
    """Stop every service recorded in the state folder (last started first), then remove it."""
    from core.services import stop_recorded

    state = _state(args)
    for name in stop_recorded(state):
        print(f"{name} stopped")
    for cls in (_mixer_class(), _bento_class(), _triton_class(), _redis_class()):  # earlier versions' pid files
        srv = cls.find(state)
        if srv is not None:
            srv.stop()
            print(f"{srv.record_name} stopped")
    state.clean()
    print(f"removed {state.root}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="home-mixer", description=__doc__.splitlines()[0])
    p.add_argument("--state", help="state folder (default $HOME_MIXER_STATE or <checkout>/.state)")
    p.add_argument("--spark-master", help="Spark master of the batch jobs (features, training sets, index, "
                                          "evaluation): spark://host:port, local[N], or auto = this state's "
                                          "`services start spark` cluster (default $HOME_MIXER_SPARK_MASTER "
                                          "or local[2])")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job end to end on the real data")
    d.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="KuaiRand-Pure folder")
    d.add_argument("--users", type=int, nargs="*", help="user ids to show timelines for")
    d.add_argument("--n-users", type=int, default=3, help="how many users when --users is not given")
    d.add_argument("--keep-running", action="store_true", help="leave Redis and the mixer running")
    d.set_defaults(func=cmd_demo)

    sv = _add_service_parser(sub, "services", "redis", "start/stop/status of the online store (single Redis, or "
                             "HA with --ha, or a Redis Cluster with --cluster N) or of a Spark standalone cluster (spark)",
                             "Start/stop/status of the online store: redis-server (AOF on) on a loopback port "
                             "recorded in <state>/run (kept across restarts), data in <state>/redis; with --ha "
                             "a primary, a replica and three redis-sentinel processes instead (clients find "
                             "the primary through the Sentinels); with --cluster N a Redis Cluster of N primaries "
                             "and N replicas (redis-cli --cluster create; data in <state>/redis-cluster). "
                             "stop/status cover whichever runs. With `spark`: "
                             "a Spark standalone master and workers from the pyspark wheel (the batch jobs take "
                             "--spark-master).",
                             port=True)
    sv.add_argument("--ha", action="store_true",
                    help="start: a primary + replica + 3 Sentinels (redis+sentinel:// address) instead of one Redis")
    sv.add_argument("--cluster", type=int, metavar="SHARDS",
                    help="start: a Redis Cluster of SHARDS primaries (>= 3) and one replica each "
                         "(redis+cluster:// address) instead of one Redis")
    sv.add_argument("engine", nargs="?", choices=["redis", "spark"], default="redis",
                    help="what to start/stop: redis (default; the online store) or spark (standalone master + workers)")
    sv.add_argument("--workers", type=int, default=2, help="spark: workers to start")
    sv.add_argument("--worker-cores", type=int, default=1, help="spark: cores each worker offers")
    sv.add_argument("--worker-memory", default="2g", help="spark: executor memory each worker offers (e.g. 2g)")
    sv.set_defaults(func=cmd_services)

    e = sub.add_parser("env", help="print shell exports for the feast/mlflow CLIs")
    e.set_defaults(func=cmd_env)

    f = sub.add_parser("features", help="offline features")
    fsub = f.add_subparsers(dest="action", required=True)
    fb = fsub.add_parser("build", help="validate, canonical tables, Spark features, feast apply, training set")
    fb.add_argument("--data", default=str(DEFAULT_DATA_DIR))
    fb.add_argument("--log", nargs="*", help="impression log CSVs instead of the shared one")
    fb.add_argument("--materialize", action="store_true", help="also materialise into Redis")
    fb.set_defaults(func=cmd_features)
    fm = fsub.add_parser("materialize", help="validate the feature tables, then fill the Redis online store")
    fm.add_argument("--no-validate", action="store_true",
                    help="skip the feature-table gate (loads tables the gate would stop)")
    fm.add_argument("--gate-config", help="YAML of the gate's tolerances (monitoring.feature_validation."
                                          "FeatureGateConfig)")
    fm.add_argument("--engine", choices=["redis", "feast"], default="redis",
                    help="redis: the project's writer of Feast's Redis layout (same bytes, ~5-10x faster); "
                         "feast: Feast's own materialize")
    fm.set_defaults(func=cmd_materialize)
    fv = fsub.add_parser("validate", help="run the feature-table gate only (no load); exit 3 when it fails")
    fv.add_argument("--gate-config", help="YAML of the gate's tolerances")
    fv.set_defaults(func=cmd_validate_features)

    t = sub.add_parser("train", help="train, log to MLflow, register and alias the rankers")
    t.add_argument("--model", choices=["light", "heavy", "both", "two_tower"], default="both",
                   help="both = light + heavy; two_tower = the learned retrieval model with its FAISS index, trained "
                        "on the engagement sequences before the validation days (served by the embedding source)")
    t.add_argument("--valid-days", type=int, default=2, help="validation days at the end of the log (1..2)")
    t.add_argument("--no-register", action="store_true", help="log the run only")
    t.add_argument("--no-ablation", dest="ablation", action="store_false",
                   help="skip the heavy ranker's feature-group ablation (one more training per group of "
                        "core.schema.FEATURE_GROUPS, logged as ablation.json in the run)")
    t.add_argument("--no-promote", action="store_true",
                   help="register the new version without moving the champion alias (promote it later)")
    t.add_argument("--from-logged", action="store_true",
                   help="train on the features the mixer logged (feature log stream in Redis), labelled by "
                        "the impressions of the same (user, post) after each serve")
    t.add_argument("--label-window-s", type=_positive_float, default=3600.0,
                   help="with --from-logged: an impression labels a serve within this many seconds after it")
    t.add_argument("--continue-from", metavar="REF",
                   help="an incremental update of the light ranker: add trees to the version this alias or "
                        "version names, fit on the training rows alone (LightGBM init_model), instead of training "
                        "from scratch (with --light-on impressions; bench/light_update.py compares the two)")
    t.add_argument("--light-on", choices=["impressions", "candidates"], default="impressions",
                   help="the light ranker's training rows: logged impressions, or the mixer's own candidate sets "
                        "as of a cutoff before the validation days labelled by the next days' engagements "
                        "(needs Redis running and champions to build the pipeline; see README, Personalisation)")
    t.add_argument("--candidate-users", type=int, default=4000,
                   help="with --light-on candidates: users with engagements on the label days (seeded sample)")
    t.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="evaluate the champions on an impression log; the whole funnel")
    ev.add_argument("--log", help="impression log CSV (KuaiRand log schema)")
    ev.add_argument("--whole-funnel", action="store_true",
                    help="whole-funnel evaluation: candidate generation as of the start of the state's validation "
                         "days, recall@K / hit rate / NDCG of the users' later engagements per source, union, served "
                         "order, popularity and co-engagement baselines (JSON in <state>/reports/whole_funnel.json, "
                         "logged to MLflow)")
    ev.add_argument("--whole-funnel-users", type=int, default=2000,
                    help="seeded sample of users with positives (0 = all; default 2000)")
    ev.add_argument("--valid-days", type=int, default=2, help="the last dates evaluated by --whole-funnel")
    ev.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="users/videos folder")
    ev.add_argument("--history", help="log whose events precede --log (default: the shared log)")
    ev.add_argument("--from-date", type=int, help="only evaluate rows with date >= this yyyymmdd")
    ev.add_argument("--request-gap-min", type=_positive_float, default=30.0,
                    help="a user's impressions on one surface with no gap longer than this form one "
                         "request (minutes, default 30)")
    ev.add_argument("--out", help="JSON report path (default state/reports/evaluation.json)")
    ev.add_argument("--funnel-users", type=int, default=0,
                    help="also measure the light ranker's funnel recall (recall@light-k of the heavy ranker's "
                         "top heavy-k over all candidates the mixer generates) for this many users of the "
                         "state's validation days, on the state's running Redis (0 = off, the default)")
    ev.add_argument("--funnel-light-k", type=int, default=200,
                    help="candidates the light ranker keeps (default 200, the mixer's heavy_ranker_top_k)")
    ev.add_argument("--funnel-heavy-k", type=int, default=20, help="the heavy ranker's top that should survive")
    ev.add_argument("--funnel-seed", type=int, default=0, help="seed of the user sample and the random floor")
    ev.set_defaults(func=cmd_evaluate)

    ix = sub.add_parser("index", help="the candidate index in Redis")
    ixsub = ix.add_subparsers(dest="action", required=True)
    ib = ixsub.add_parser("build", help="co-engagement neighbours (Spark), action sequences and candidate lists "
                                        "from the canonical tables, as of a cutoff (replaces the index)")
    ib.add_argument("--as-of", help="cutoff, ISO-8601 (default: the end of the log)")
    ib.add_argument("--sequence-length", type=int, default=64, help="engagements kept per user (default 64)")
    ib.add_argument("--window", type=int, default=10, help="co-engagement window in sequence positions")
    ib.add_argument("--neighbours", type=int, default=200, help="co-engagement neighbours kept per post")
    ib.add_argument("--no-coengagement", action="store_true", help="skip the Spark co-engagement job")
    ib.add_argument("--ann", choices=["auto", "on", "off"], default="auto",
                    help="also re-embed the catalogue with the champion two-tower's candidate tower and register "
                         "its FAISS index as a new two_tower version (auto: when a champion exists)")
    ib.add_argument("--ann-kind", choices=["hnsw", "ivfpq", "flat"], default="hnsw", help="FAISS index kind")
    ib.add_argument("--no-promote", action="store_true",
                    help="register the new two_tower version without moving the champion alias")
    ib.set_defaults(func=cmd_index_build)

    m = sub.add_parser("models", help="registry operations")
    msub = m.add_subparsers(dest="action", required=True)
    pr = msub.add_parser(
        "promote", help="point an alias at a registered version (refused if it ranks worse than the current one)",
        description="Move the alias to --version. First both versions score the validation days of the "
                    "state's training set: if the new version's request-level GAUC is below the current "
                    "version's on any head with >= 100 positives, the promotion is refused (exit 1) unless "
                    "--force is given. Rolling back to an older version is the same check: use --force to "
                    "roll back to a worse version in an emergency.")
    pr.add_argument("--model", choices=["light", "heavy", "two_tower"], required=True,
                    help="two_tower has no request-GAUC gate (it retrieves; its runs log held-out recall)")
    pr.add_argument("--version", type=int, required=True)
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--force", action="store_true",
                    help="promote even if the version ranks worse than the current one on a head (emergency "
                         "rollback), or when there is no training set to check on")
    pr.set_defaults(func=cmd_promote)

    sv = sub.add_parser("serve", help="the mixer and the model servers")
    svsub = sv.add_subparsers(dest="service", required=True)
    tr = _add_service_parser(
        svsub, "triton", "triton", "Triton inference server for the rankers (separate venv)",
        "start: sync the model repository from the registry, then start Triton (or reload it if running); "
        "stop; status; sync: sync and reload the models of a running server.",
        actions=("start", "stop", "status", "sync"), timeout=120.0)
    tr.add_argument("--rows", type=int, default=2000, help="validation rows for the export check")
    _add_service_parser(
        svsub, "bentoml", "bentoml", "the BentoML ranker server (light + heavy) as a background process",
        "Start/stop/status of `bentoml serve serving.bento.service:HomeMixerRankers` on a 127.0.0.1 port; "
        "record and log in <state>/run/.", port=True, timeout=120.0)
    mx = _add_service_parser(
        svsub, "mixer", "mixer", "the mixer HTTP API",
        "Without an action (or `run`): the mixer in the foreground (default port 8080). "
        "start/stop/status: a background mixer supervised through <state>/run/mixer.json. "
        "--replicas N: N mixer processes behind HAProxy (run, start; stop and status find it). "
        "token: print the bearer token to send (`Authorization: Bearer $(home-mixer serve mixer token)`).",
        actions=("start", "stop", "status", "token"), port=True, default_action="run")
    mx.add_argument("--config", help="mixer YAML (default: embedded mixer/mixer.yaml)")
    mx.add_argument("--host", default="127.0.0.1")
    mx.add_argument("--workers", type=int, default=None,
                    help="worker processes behind the port, each with its own models and connections "
                         "(default: one per core)")
    mx.add_argument("--replicas", type=int, default=None,
                    help="run/start: N mixer processes, each on its own loopback port, behind HAProxy on "
                         "--port (health checks, a bounded queue, retries; the config's front_door section; "
                         "records in <state>/run, HAProxy config in <state>/haproxy)")
    mx.set_defaults(func=cmd_serve_mixer)

    mo = sub.add_parser("monitor", help="drift job and dashboards; Prometheus (start|stop|status)")
    mosub = mo.add_subparsers(dest="action", required=True)
    dr = mosub.add_parser("drift", help="a window against the champion's training reference and the days before "
                                        "(Evidently; growing features in their declared forms); exit 3 when the "
                                        "share of drifted features passes the gate or a feature has a critical fault")
    dr.add_argument("--window", help="1h / 24h / <n>h / <n>m: the mixer's production sample of that recent window; "
                                     "or FROM..TO log dates (yyyymmdd) of the training set (default: the validation days)")
    dr.add_argument("--against", default="champion",
                    help="'champion' (its training reference, default) or FROM..TO dates of the training set")
    dr.add_argument("--log", help="an impression log CSV (KuaiRand schema) as the current window")
    dr.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="users/videos folder for --log")
    dr.add_argument("--method", help="one Evidently stat test for every column, e.g. psi (default: per column type and size)")
    dr.add_argument("--max-drift-share", type=float, default=None,
                    help="gate on the share of drifted features (default 0.3, or the gate config's)")
    dr.add_argument("--gate-config", help="YAML of the drift gate's thresholds (monitoring.drift.DriftGateConfig: "
                                          "max_drift_share, null_share_tolerance, scale_ratio, stale_jump, ...)")
    dr.add_argument("--out", help="report folder (default <state>/reports/drift/<time>)")
    dr.set_defaults(func=cmd_monitor_drift)
    db = mosub.add_parser("dashboard", help="write the drift dashboard: one static HTML page of every drift run "
                                            "(plots, links to the Evidently reports; opens with no network)")
    db.add_argument("--out", help="page path (default <state>/reports/drift/index.html)")
    db.set_defaults(func=cmd_monitor_dashboard)
    for action, text in (("start", "start the drift exporter and Debian's Prometheus for the state folder (scrapes "
                                   "the mixer, the stream processor and the drift exporter; alert rules loaded); "
                                   "refreshes its targets if it runs"),
                         ("stop", "stop the state folder's Prometheus and drift exporter"),
                         ("status", "is Prometheus running: address, scrape targets, alerts (exit 1 if not)")):
        pm = mosub.add_parser(action, help=text, description=text + ". Config, data and log in <state>/prometheus; "
                              "record in <state>/run/prometheus.json.")
        pm.add_argument("--timeout", type=float, default=None,
                        help="start: seconds to wait for readiness (default: the service's)")
        pm.add_argument("--json", action="store_true", help="status: print a JSON object")
        pm.add_argument("--port", type=int, default=None,
                        help="start: port on 127.0.0.1 (default: the one recorded in <state>/run, else a free one)")
        pm.add_argument("--scrape-interval", type=_positive_float, default=5.0,
                        help="start: scrape and rule-evaluation interval in seconds (default 5)")
        pm.set_defaults(func=cmd_monitor_service, service_spec="prometheus")
    gf = mosub.add_parser("grafana", help="write the on-call Grafana dashboard JSON (generated from code, checked "
                                          "against Grafana's dashboard schema)")
    gf.add_argument("--out", help="JSON path (default <state>/reports/grafana/home_mixer_oncall.json)")
    gf.set_defaults(func=cmd_monitor_grafana)

    xp = sub.add_parser("experiment", help="online experiments: the readout of an experiment's arms")
    xpsub = xp.add_subparsers(dest="action", required=True)
    xr = xpsub.add_parser("report", help="per arm: users, impressions, each head's rate with 95 %% intervals, "
                                         "lift against control, SRM and guardrails (HTML + JSON); exit 4 on "
                                         "SRM or a guardrail breach")
    xr.add_argument("experiment", nargs="?", help="experiment id (default: the config's experiment.id)")
    xr.add_argument("--config", help="the mixer config the experiment ran with (arms, shares)")
    xr.add_argument("--impressions", help="canonical impressions parquet with the engagements "
                                          "(default <state>/tables/impressions)")
    xr.add_argument("--control", help="the arm lifts are against (default: the config's first arm)")
    xr.add_argument("--window-s", type=_positive_float, default=3600.0,
                    help="a serve is engaged by the first impression of its (user, post) within this many seconds")
    xr.add_argument("--max-p99-ratio", type=_positive_float, default=1.2,
                    help="guardrail: a treatment's p99 pipeline time over the control's")
    xr.add_argument("--max-share-increase", type=float, default=0.01,
                    help="guardrail: a treatment's degraded / fallback share over the control's")
    xr.add_argument("--out", help="report folder (default <state>/reports/experiments/<id>/<time>)")
    xr.set_defaults(func=cmd_experiment_report)
    xs = xpsub.add_parser("simulate", help="simulated users (a response model learned from the log) against a "
                                           "mixer started with --config, then the readout")
    xs.add_argument("--config", help="the mixer config with the experiment (arms, shares; default: embedded)")
    xs.add_argument("--users", type=int, default=200, help="simulated users, drawn from the log")
    xs.add_argument("--sessions", type=int, default=2, help="pages each user asks for")
    xs.add_argument("--seed", type=int, default=0, help="user sample and response draws")
    xs.add_argument("--workers", type=int, default=1, help="mixer worker processes (and requests in flight)")
    xs.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="the KuaiRand folder the response model learns from")
    xs.set_defaults(func=cmd_experiment_simulate)
    xo = xpsub.add_parser("ope", help="off-policy evaluation: each arm's value (greedy, or softmax at "
                                      "--temperature) estimated by IPS, SNIPS and DR from an exploring arm's "
                                      "logged pages; --simulate: against simulated users' true values")
    xo.add_argument("--config", help="the mixer config (its arms are the targets; one arm explores)")
    xo.add_argument("--arm", help="the exploring arm whose pages are the log (default: the first)")
    xo.add_argument("--head", default="click", help="the reward: engagements on this head (default click)")
    xo.add_argument("--temperature", type=_positive_float, default=None,
                    help="evaluate the targets as softmax policies at this temperature (default: greedy)")
    xo.add_argument("--weights", help="also evaluate these blend weights (JSON head -> weight) as `custom`")
    xo.add_argument("--impressions", help="canonical impressions parquet with the engagements "
                                          "(default <state>/tables/impressions)")
    xo.add_argument("--simulate", action="store_true",
                    help="serve simulated users first (a mixer with --config) and print each target's truth")
    xo.add_argument("--users", type=int, default=200, help="--simulate: simulated users")
    xo.add_argument("--sessions", type=int, default=2, help="--simulate: pages each user asks for")
    xo.add_argument("--seed", type=int, default=0, help="--simulate: user sample and response draws")
    xo.add_argument("--workers", type=int, default=1, help="--simulate: mixer worker processes")
    xo.add_argument("--data", default=str(DEFAULT_DATA_DIR), help="--simulate: the KuaiRand folder")
    xo.add_argument("--json", help="also write the rows to this JSON file")
    xo.set_defaults(func=cmd_experiment_ope)
    lp = sub.add_parser("loop", help="the model updater: retrain from served traffic, shadow, ramp, promote or roll back")
    lpsub = lp.add_subparsers(dest="action", required=True)
    lr = lpsub.add_parser("run", help="wait for a trigger (new labelled serves, the drift gate, the schedule), then "
                                      "run a cycle; each decision is an MLflow run of experiment home-mixer-loop")
    lr.add_argument("--mixer-config", required=True, help="the YAML file the mixers were started with (its "
                                                          "experiment is rewritten during a cycle and restored)")
    lr.add_argument("--config", help="loop settings YAML (home_mixer/loop.py LoopSettings; default: built-in)")
    lr.add_argument("--once", action="store_true", help="run one cycle now, whatever the triggers")
    lr.add_argument("--poll-s", type=_positive_float, default=60.0, help="seconds between trigger checks")
    lr.set_defaults(func=cmd_loop_run)
    ex = sub.add_parser("export", help="export a registered ranker, or the two-tower's user tower, to ONNX "
                                       "(checked against the native model)")
    ex.add_argument("--model", choices=sorted(MODEL_NAMES), required=True)
    ex.add_argument("--alias", default="champion")
    ex.add_argument("--out", help="output folder for model.onnx (default <state>/onnx/<name>/<version>)")
    ex.add_argument("--rows", type=int, default=2000,
                    help="validation rows for the check (two_tower: users' action sequences)")
    ex.set_defaults(func=cmd_export)

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
    st.add_argument("--fanout-config", help="run: YAML with a 'fanout:' mapping (celebrity threshold, timeline "
                                            "length, backfill) for the social graph's follow backfill")
    st.set_defaults(func=cmd_stream)

    gr = sub.add_parser("graph", help="the follow graph: load a SNAP edge list, generate one, or build KuaiRand's")
    grsub = gr.add_subparsers(dest="action", required=True)
    gl = grsub.add_parser("load", help="load a SNAP edge list ('follower followee' per line, '#' comments, .gz ok)")
    gl.add_argument("path", help="the edge list file")
    gg = grsub.add_parser("generate", help="a synthetic graph with Twitter's follower power law (Kwak et al. 2010) "
                                           "and a celebrity tail")
    gg.add_argument("--users", type=int, required=True, help="number of users")
    gg.add_argument("--mean-followees", type=float, default=30.0, help="mean followees per user")
    gg.add_argument("--seed", type=int, default=0, help="random seed (same seed, same graph)")
    gg.add_argument("--out", help="also write the graph as a SNAP edge list (.gz: gzipped)")
    gk = grsub.add_parser("kuairand", help="KuaiRand's graph: explicit follows plus engaged authors "
                                           "(pipelines.graph.kuairand documents the rule)")
    gk.add_argument("--min-weight", type=float, default=2.0,
                    help="RealGraph-style engagement weight that makes an engaged author a followee")
    for g in (gl, gg, gk):
        g.add_argument("--no-load", action="store_true", help="write the canonical table only, not Redis")
        g.add_argument("--quiet", action="store_true", help="no progress bars")
    grsub.add_parser("export", help="snapshot the graph in Redis (loads + streamed follows / unfollows / blocks) "
                                    "into the canonical follow_graph table for offline jobs")
    gr.set_defaults(func=cmd_graph)

    fo = sub.add_parser("fanout", help="fan-out workers: post events -> followers' home timelines")
    fo.add_argument("action", choices=["run"])
    fo.add_argument("--workers", type=int, default=1, help="worker processes (one consumer of the group each)")
    fo.add_argument("--config", help="YAML file with a 'fanout:' mapping (default pipelines/graph/fanout.yaml)")
    fo.add_argument("--consumer", help="consumer name (default <host>-<pid>; with --workers N, a prefix)")
    fo.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port (0 = any free; "
                                                     "worker i of N gets port + i)")
    fo.add_argument("--reclaim-idle-ms", type=int, help="take over posts another worker left pending this long")
    fo.add_argument("--page-pause-ms", type=float, help="throttle: pause between follower pages (ms)")
    fo.set_defaults(func=cmd_fanout)

    c = sub.add_parser("clean", help="stop services and remove the state folder")
    c.set_defaults(func=cmd_clean)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from core.services import ServiceError

    try:
        if args.spark_master:
            from pipelines.spark import MASTER_ENV

            # read by pipelines.spark.spark_session wherever a job opens its session (child processes too)
            os.environ[MASTER_ENV] = _spark_master(_state(args), args.spark_master)
        return args.func(args)
    except (ServiceError, FileNotFoundError, UsageError) as exc:
        print(f"home-mixer: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # domain errors carry their own advice
        name = type(exc).__name__
        if name in {"DataValidationError", "FeatureValidationError", "RawDataMissingError", "RawDataParseError",
                    "RankerNotFoundError", "ConfigError", "MissingFeaturesError", "TritonNotInstalledError",
                    "ExportError", "ExportMismatchError", "FanoutConfigError", "EdgeListError"}:
            print(f"home-mixer: {name}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
