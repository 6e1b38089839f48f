"""``python -m pipelines.features``: run raw -> validation -> canonical -> features into a state folder."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from home_mixer.state import DEFAULT_DATA_DIR, StateDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.features", description=__doc__)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("HOME_MIXER_DATA", DEFAULT_DATA_DIR)),
                        help="folder of the raw KuaiRand-Pure files (default $HOME_MIXER_DATA or ../shared/data)")
    parser.add_argument("--state", type=Path, default=None,
                        help="state folder (default $HOME_MIXER_STATE or <checkout>/.state)")
    parser.add_argument("--log-file", type=Path, action="append", default=None,
                        help="log file of the same schema instead of the default (repeatable: concatenated)")
    args = parser.parse_args(argv)

    from pipelines.features.runner import run_batch_pipeline

    state = StateDir(args.state.resolve()) if args.state else StateDir.from_env()
    summary = run_batch_pipeline(args.data, state, log_paths=args.log_file)
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
