"""``home-mixer serve triton start|stop|status|sync`` and ``home-mixer export``.

Wiring (``home_mixer/cli.py``, in ``build_parser`` after the ``serve`` sub-parsers are made)::

    from serving.triton.cli import add_commands
    add_commands(sub, svsub)   # sub: top-level subparsers, svsub: the `serve` subparsers

Each command reads the state folder from the top-level ``--state`` option (else
``$HOME_MIXER_STATE`` / ``<checkout>/.state``), prints a clear error and returns 2 for a user's
mistake (missing install, model, alias or training set; a failed export check).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.schema import CHAMPION_ALIAS, HEAVY_RANKER_NAME, LIGHT_RANKER_NAME
from core.state import StateDir, state_from_cli

MODEL_NAMES = {"light": LIGHT_RANKER_NAME, "heavy": HEAVY_RANKER_NAME}
_USER_ERRORS = {"TritonNotInstalledError", "ServiceError", "RankerNotFoundError", "ExportError",
                "ExportMismatchError", "FileNotFoundError", "MissingFeaturesError"}


def _state(args) -> StateDir:
    return state_from_cli(getattr(args, "state", None))


def _guarded(func):
    def run(args) -> int:
        try:
            return func(args)
        except Exception as exc:
            if type(exc).__name__ in _USER_ERRORS:
                print(f"home-mixer: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 2
            raise
    run.__doc__ = func.__doc__
    return run


def _sync(state: StateDir, rows: int):
    from serving.export import validation_rows
    from serving.triton.repository import sync_repository
    from serving.triton.server import repository_dir

    return sync_repository(state.mlflow_tracking_uri, repository_dir(state),
                           check_rows=lambda: validation_rows(state, n=rows))


def _print_sync(report) -> None:
    for name, s in report.items():
        aliases = ", ".join(f"{a}=v{v}" for a, v in s.aliases.items())
        print(f"{name}: serving versions {list(s.served)} ({aliases})")
        for e in s.exported:
            print(f"  exported v{e.version} -> {e.path} (max |onnx - native| = {e.max_abs_diff:.1e} "
                  f"on {e.rows_checked} rows, {e.seconds:.1f} s)")


@_guarded
def cmd_triton(args) -> int:
    """start: sync the repository from the registry, then start Triton (or reload it if running);
    stop; status; sync: sync and reload the models of a running server."""
    from serving.triton.server import TritonServer

    state = _state(args)
    running = TritonServer.running(state)
    if args.action == "stop":
        if running:
            running.stop()
            print("triton stopped")
        else:
            print("triton is not running")
        return 0
    if args.action == "status":
        print(json.dumps(running.status() if running else {"running": False}, indent=1))
        return 0
    if args.action == "start" and not running:
        from serving.triton.install import TritonInstallation

        TritonInstallation.find()  # fail before exporting anything
    report = _sync(state, args.rows)
    _print_sync(report)
    if running:
        for name, sync in report.items():
            if sync.changed or running.versions(name) != list(sync.served):
                print(f"{name}: reloaded, ready versions {running.load(name)}")
            else:
                print(f"{name}: unchanged, ready versions {list(sync.served)}")
        print(f"triton running: grpc {running.grpc_url}, http {running.http_url} (pid {running.pid})")
        return 0
    if args.action == "sync":
        print("triton is not running: `home-mixer serve triton start` serves the synced repository")
        return 0
    srv = TritonServer(state).start(timeout_s=args.timeout)
    print(f"triton started in {srv.started_seconds:.1f} s: grpc {srv.grpc_url}, http {srv.http_url}, "
          f"metrics {srv.metrics_url} (pid {srv.pid}; log {srv.log_file})")
    for name in srv.models:
        print(f"  {name}: ready versions {srv.versions(name)}")
    return 0


@_guarded
def cmd_export(args) -> int:
    """Export one registered ranker (by alias) to ONNX, checked against the native model."""
    from serving.export import export_version, resolve_alias, validation_rows

    state = _state(args)
    started = time.monotonic()
    name, uri = MODEL_NAMES[args.model], state.mlflow_tracking_uri
    version = resolve_alias(name, args.alias, uri)  # once: the folder is named by this version
    out = Path(args.out) if args.out else state.root / "onnx" / name / str(version)
    rows = validation_rows(state, n=args.rows)
    res = export_version(name, version, uri, out, rows, alias=args.alias)
    print(f"{res.name}@{args.alias} = v{res.version} (run {res.run_id}) -> {res.path}")
    print(f"  features [batch, {len(res.feature_names)}] -> probabilities [batch, {len(res.heads)}] {list(res.heads)}")
    print(f"  max |onnx - native| = {res.max_abs_diff:.2e} on {res.rows_checked} validation rows; "
          f"{time.monotonic() - started:.1f} s")
    return 0


def _serve_subparsers(subparsers) -> argparse._SubParsersAction:
    """The ``serve`` sub-command's subparsers, created if ``serve`` does not exist yet."""
    serve = subparsers.choices.get("serve")
    if serve is None:
        serve = subparsers.add_parser("serve", help="run a service")
        return serve.add_subparsers(dest="service", required=True)
    for action in serve._actions:  # argparse keeps a parser's subparsers among its actions
        if isinstance(action, argparse._SubParsersAction):
            return action
    return serve.add_subparsers(dest="service", required=True)


def add_commands(subparsers, serve_subparsers=None) -> None:
    """Add ``serve triton start|stop|status|sync`` and ``export`` to a ``home-mixer`` parser.

    Args:
        subparsers: the top-level ``add_subparsers()`` object (gets ``export``).
        serve_subparsers: the ``serve`` command's subparsers (gets ``triton``); if None it is
            looked up under ``subparsers`` (or ``serve`` is created).
    """
    serve_sub = serve_subparsers if serve_subparsers is not None else _serve_subparsers(subparsers)
    tr = serve_sub.add_parser("triton", help="Triton inference server for the rankers (separate venv)",
                              description=cmd_triton.__doc__)
    tr.add_argument("action", choices=["start", "stop", "status", "sync"])
    tr.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness (start)")
    tr.add_argument("--rows", type=int, default=2000, help="validation rows for the export check")
    tr.set_defaults(func=cmd_triton)

    ex = subparsers.add_parser("export", help="export a registered ranker to ONNX (checked against the native model)")
    ex.add_argument("--model", choices=sorted(MODEL_NAMES), required=True)
    ex.add_argument("--alias", default=CHAMPION_ALIAS)
    ex.add_argument("--out", help="output folder for model.onnx (default <state>/onnx/<name>/<version>)")
    ex.add_argument("--rows", type=int, default=2000, help="validation rows for the check")
    ex.set_defaults(func=cmd_export)
