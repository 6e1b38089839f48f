"""``home-mixer serve bentoml start|stop|status``: the BentoML ranker server in the background.

Wiring (in ``home_mixer/cli.py``'s ``build_parser``, after ``svsub`` is created)::

    from serving.bento.cli import add_commands as add_bentoml_commands
    add_bentoml_commands(svsub)
"""

from __future__ import annotations

import argparse
import json

from core.state import StateDir, state_from_cli


def _state(args) -> StateDir:
    return state_from_cli(getattr(args, "state", None))


def cmd_serve_bentoml(args) -> int:
    """Run one action; prints one line (``status --json``: a JSON object). Returns the exit code:
    0, or 1 for ``status`` when the server is not running.

    Raises:
        core.services.ServiceError: start failed (message has model load errors and log lines).
    """
    from serving.bento.server import BentoServer

    state = _state(args)
    running = BentoServer.running(state)
    if args.action == "start":
        if running:
            print(f"bentoml already running: {running.url} (pid {running.pid})")
            return 0
        srv = BentoServer(state, port=args.port).start(timeout_s=args.timeout)
        print(f"bentoml started: {srv.url} (pid {srv.pid}, log {srv.log_path})")
    elif args.action == "stop":
        if running:
            running.stop()
            print("bentoml stopped")
        else:
            print("bentoml is not running")
    else:
        status = BentoServer(state).status()
        if args.json:
            print(json.dumps(status))
        elif status["running"]:
            print(f"bentoml: running {status['url']} (pid {status['pid']}, "
                  f"{'ready' if status['ready'] else 'not ready'}, log {status['log']})")
        else:
            print("bentoml: stopped")
        return 0 if status["running"] else 1
    return 0


def add_commands(serve_subparsers: "argparse._SubParsersAction") -> None:
    """Add ``bentoml start|stop|status`` under the ``serve`` command's subparsers.

    Args:
        serve_subparsers: the object returned by ``serve_parser.add_subparsers(...)``; the
            handler is set as ``func`` and reads the top-level ``--state`` if the parser has one.
    """
    b = serve_subparsers.add_parser(
        "bentoml", help="the BentoML ranker server (light + heavy) as a background process",
        description="Start/stop/status of `bentoml serve serving.bento.service:HomeMixerRankers` on a free "
                    "127.0.0.1 port; pid, port and log in <state>/run/.")
    b.add_argument("action", choices=["start", "stop", "status"])
    b.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: a free one)")
    b.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for readiness at start")
    b.add_argument("--json", action="store_true", help="status as JSON")
    b.set_defaults(func=cmd_serve_bentoml)
