"""Time from ``home-mixer models promote`` to the new version serving, through Triton and the mixer.

On a state folder the demo filled: starts Redis, Triton (repository synced from the registry) and
the mixer with ``scoring.backend: triton_grpc``; registers a new light ranker version without
moving the alias; then promotes it (the CLI command: registry alias, Triton export + load) and
polls the mixer until its responses carry the new version scored on Triton. Then rolls back the
same way. Prints both times, split into the promote command and the wait for the mixer's watcher.

    .venv/bin/python bench/rollout.py [--state .state]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)  # bench/serving.py would shadow the `serving` package

import httpx

from home_mixer.cli import main as cli
from home_mixer.demo import start_mixer
from pipelines.training_set import load_training_set, log_end
from core.services import RedisServer
from core.state import StateDir


def wait_for(base: str, user: int, version: int, headers: dict[str, str], timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = httpx.post(f"{base}/v1/home-timeline", json={"user_id": user, "limit": 5}, headers=headers,
                          timeout=10).json()
        if body["model_versions"]["light_ranker"] == str(version):
            return body
        time.sleep(0.05)
    raise TimeoutError(f"light_ranker v{version} not served after {timeout_s} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--state", default=None)
    args = ap.parse_args()
    state = StateDir(Path(args.state).resolve()) if args.state else StateDir.from_env()

    from models.light_ranker import LightRankerParams
    from models.registry import alias_version
    from models.split import split_by_days
    from models.train import train_light
    from serving.export import validation_rows
    from serving.triton.repository import sync_repository
    from serving.triton.server import TritonServer, repository_dir

    uri = state.mlflow_tracking_uri
    old = alias_version("light_ranker", tracking_uri=uri)
    train, valid = split_by_days(load_training_set(state), valid_days=2)
    new = train_light(train, valid, state, set_champion=False,
                      params=LightRankerParams(num_boost_round=50)).model_version
    print(f"registered light_ranker v{new} (champion stays v{old})")

    started_redis = triton = mixer = None
    try:
        redis_srv = RedisServer.running(state)
        if redis_srv is None:
            redis_srv = started_redis = RedisServer(state).start()
        sync_repository(uri, repository_dir(state), check_rows=lambda: validation_rows(state, n=2000))
        triton = TritonServer(state).start()
        config = state.run / "rollout-mixer.yaml"
        config.write_text(f"clock:\n  now: \"{log_end(state).isoformat().replace('+00:00', 'Z')}\"\n"
                          f"models:\n  reload_interval_s: 1\n"
                          f"scoring:\n  backend: triton_grpc\n  url: \"{triton.grpc_url}\"\n  timeout_ms: 200\n")
        mixer, base = start_mixer(state, redis_srv.url, config=config, name="bench-mixer")
        user = int(load_training_set(state)["user_id"].iloc[0])
        body = wait_for(base, user, old, mixer.auth_headers)
        print(f"mixer serving light_ranker v{old} via {body['scoring_paths']}")
        for target, label in ((new, "promote"), (old, "rollback")):
            t0 = time.monotonic()
            cli(["--state", str(state.root), "models", "promote", "--model", "light", "--version", str(target)])
            t_cmd = time.monotonic() - t0
            body = wait_for(base, user, target, mixer.auth_headers)
            t_all = time.monotonic() - t0
            print(f"{label} to v{target}: command {t_cmd:.1f} s (alias + Triton export/load), "
                  f"serving after {t_all:.1f} s, paths {body['scoring_paths']}")
    finally:
        if mixer is not None:
            mixer.stop()
        if triton is not None:
            triton.stop()
        if started_redis is not None:
            started_redis.stop()


if __name__ == "__main__":
    main()
