"""CPU cost of the feature-log side effect per served page, against the floor of its bare writes.

Self-contained: starts a redis-server on a temporary state folder, builds a served page of
``--items`` posts with a 200-row feature frame (as the heavy ranker hands it over), then times
``FeatureLogSideEffect.apply`` (encoding, entry fields, one pipeline of capped ``XADD``) against the
floor: the same ``XADD`` pipeline with every field already encoded, i.e. what redis-py and the
round trip cost whatever the side effect does. Prints CPU and wall per page for both and the ratio.
The mixer's CPU per answer (``bench/load.py``, about 25 ms) is the budget this is a share of.

    .venv/bin/python bench/feature_log.py [--items 20] [--pages 2000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import online_layout as keys  # noqa: E402
from core.schema import ALL_FEATURES  # noqa: E402
from core.services import RedisServer  # noqa: E402
from core.state import StateDir  # noqa: E402


def _time(fn, reps: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per call of ``fn`` over ``reps`` calls, after 50 warm-up calls."""
    for _ in range(50):
        fn()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.process_time() - cpu) / reps * 1e3, (time.perf_counter() - wall) / reps * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=20, help="served items per page")
    ap.add_argument("--pages", type=int, default=2000, help="timed pages per implementation")
    args = ap.parse_args(argv)

    import redis

    from mixer.candidate import Candidate, Query
    from mixer.components import TimelineResult
    from mixer.side_effects import FeatureLogSideEffect

    with tempfile.TemporaryDirectory(prefix="hm-bench-feature-log-") as tmp:
        srv = RedisServer(StateDir(Path(tmp)).ensure()).start()
        try:
            client = redis.Redis.from_url(srv.url)
            cands = [Candidate(post_id=1000 + i, source="popular", author_id=7 + i) for i in range(200)]
            frame = pd.DataFrame(np.random.default_rng(0).normal(size=(200, len(ALL_FEATURES))),
                                 columns=list(ALL_FEATURES))
            query = Query(user_id=42, page_size=args.items, now_s=1_651_680_000.5, request_id="b" * 32, surface=0)
            result = TimelineResult(query, cands[5:5 + args.items][::-1], None, {}, [], {}, {},
                                    {"light_ranker": "3", "heavy_ranker": "5"}, ranked=cands, features=frame)
            effect = FeatureLogSideEffect(client, maxlen=100_000)

            effect.apply(result)
            (_, fields), = client.xrange(keys.SERVED_FEATURES, count=1)
            encoded = [dict(fields)] * args.items  # the entries exactly as written, bytes already

            def floor() -> None:
                pipe = client.pipeline(transaction=False)
                for f in encoded:
                    pipe.xadd(keys.SERVED_FEATURES, f, maxlen=100_000, approximate=True)
                pipe.execute()

            side = _time(lambda: effect.apply(result), args.pages)
            bare = _time(floor, args.pages)
            print(f"feature log of {args.items} items per page to a real Redis, {args.pages} pages:")
            for name, (cpu, wall) in (("side effect", side), ("bare XADDs", bare)):
                print(f"  {name:12s} CPU {cpu * 1e3:7.0f} us   wall {wall * 1e3:7.0f} us")
            print(f"  ratio side effect / bare writes: CPU {side[0] / bare[0]:.2f}x   wall {side[1] / bare[1]:.2f}x")
            client.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
