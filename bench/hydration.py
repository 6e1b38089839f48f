"""Feature hydration for 1 user + N posts: the Feast SDK and the direct Feast-layout reader against
the raw Redis floor.

Self-contained: starts a redis-server on a temporary state folder, applies the Feast views, writes
synthetic rows of realistic size with ``FeatureStore.write_to_online_store`` (the KuaiRand
catalogue has ~7.6k posts and ~6.5k authors), then times ``hydrate`` of both implementations on
the same candidates (same Redis, same output frame; equality is checked first), cold (no post
cache: every view is read). The floor is the cheapest standard read of the same data: one
pipeline of plain ``HMGET`` of the same keys and fields, replies left as raw bytes (no decoding, no
frame). Prints p50/p99 per path, the SDK/direct ratio and the direct/floor ratio (issue 23's
target: <= 1.3). Stops Redis at the end. All run after ``gc.collect(); gc.freeze()``, as in the
mixer process.

    .venv/bin/python bench/hydration.py [--posts 1000] [--requests 100]
"""

from __future__ import annotations

import prometheus_client  # noqa: F401,I001  (before feast: keeps metrics in memory)

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import claim_prometheus_env  # noqa: E402
from core.schema import FEATURE_VIEWS  # noqa: E402
from core.services import RedisServer  # noqa: E402
from core.state import StateDir  # noqa: E402

CATALOGUE_POSTS, CATALOGUE_AUTHORS, CATALOGUE_TAGS, USERS = 7583, 6510, 67, 2000
NOW = pd.Timestamp("2022-05-04T16:00:00Z")


def _rows(spec, entities: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    n = len(entities)
    frame = entities.reset_index(drop=True).copy()
    frame["event_timestamp"] = NOW - pd.to_timedelta(rng.integers(1, 86_400, n), unit="s")
    for name, dtype in spec.features.items():
        frame[name] = (rng.integers(0, 1_700_000_000, n).astype("int64") if dtype == "int64"
                       else rng.gamma(2.0, 10.0, n))
    return frame


def populate(store, user_id: int, n_posts: int, rng: np.random.Generator):
    """Write all views; return the candidates (post, author, tag) of the measured user."""
    post_author = pd.DataFrame({"post_id": np.arange(CATALOGUE_POSTS, dtype="int64"),
                                "author_id": rng.integers(0, CATALOGUE_AUTHORS, CATALOGUE_POSTS).astype("int64"),
                                # primary tag; -1: a post without tags (no user_tag read)
                                "tag_id": rng.integers(-1, CATALOGUE_TAGS, CATALOGUE_POSTS).astype("int64")})
    candidates = post_author.sample(n_posts, random_state=1)
    users = pd.DataFrame({"user_id": np.arange(USERS, dtype="int64")})
    # the measured user has history with ~60% of the candidates' authors and tags; others with a few each
    def with_history(key: str, catalogue: int) -> pd.DataFrame:
        mine = candidates.loc[candidates[key] >= 0, [key]].drop_duplicates().sample(
            frac=0.6, random_state=2).assign(user_id=user_id)
        others = pd.DataFrame({"user_id": rng.integers(0, USERS, 20_000), key: rng.integers(0, catalogue, 20_000)})
        return pd.concat([mine, others]).drop_duplicates(["user_id", key]).astype("int64")[["user_id", key]]

    entities = {("user_id",): users, ("post_id",): post_author[["post_id"]],
                ("user_id", "author_id"): with_history("author_id", CATALOGUE_AUTHORS),
                ("user_id", "tag_id"): with_history("tag_id", CATALOGUE_TAGS)}
    for spec in FEATURE_VIEWS:
        store.write_to_online_store(spec.name, _rows(spec, entities[tuple(spec.join_keys)], rng))
    return list(candidates.itertuples(index=False))


def _time(fn, requests: int) -> np.ndarray:
    fn()  # warm-up
    out = []
    for _ in range(requests):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return np.array(out)


def _reads(hydrator, query, cands) -> list[tuple[bytes, list[bytes]]]:
    """``(key, fields)`` of every hash the direct hydrator reads for the request: the groups its
    ``_read`` gets (one hydration run, recorded)."""
    seen = []
    read = hydrator._read

    def record(groups):
        seen.extend((key, hydrator.layout.fields[v.name]) for v, keys in groups for key in keys)
        return read(groups)

    hydrator._read = record
    try:
        hydrator.hydrate(query, cands)
    finally:
        del hydrator._read
    return seen


def _hmget_floor(client, reads) -> list:
    """The raw floor: one pipeline of plain HMGETs, replies as bytes."""
    pipe = client.pipeline(transaction=False)
    for key, fields in reads:
        pipe.hmget(key, fields)
    return pipe.execute()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=100)
    args = ap.parse_args(argv)

    import redis

    with tempfile.TemporaryDirectory(prefix="hm-bench-hydration-") as tmp:
        state = StateDir(Path(tmp)).ensure()
        srv = RedisServer(state).start()
        try:
            from feature_repo import store as fs
            from mixer.candidate import Candidate, Query
            from core.online_layout import FeastRedisLayout
            from mixer.feature_hydrators import FeastLayoutFeatureHydrator, FeastSdkFeatureHydrator

            claim_prometheus_env()
            store = fs.open_store(state, srv.feast_connection_string)
            fs.apply(store, state.tables)
            t0 = time.perf_counter()
            user = 7
            pairs = populate(store, user, args.posts, np.random.default_rng(0))
            print(f"wrote online rows in {time.perf_counter() - t0:.1f} s")

            client = redis.Redis.from_url(srv.url)
            direct = FeastLayoutFeatureHydrator(client, FeastRedisLayout("home_mixer"))
            sdk = FeastSdkFeatureHydrator(store)
            query = Query(user_id=user, page_size=20, now_s=NOW.timestamp(), request_id="bench")
            cands = [Candidate(post_id=int(p), source="bench", author_id=int(a), tag_id=int(t)) for p, a, t in pairs]
            pd.testing.assert_frame_equal(direct.hydrate(query, cands), sdk.hydrate(query, cands), check_exact=True)
            gc.collect()
            gc.freeze()  # as the mixer does after start-up (mixer/api.py)

            reads = _reads(direct, query, cands)
            n_values = sum(len(fields) for _, fields in reads)
            floor = lambda: _hmget_floor(client, reads)  # noqa: E731
            t_sdk = _time(lambda: sdk.hydrate(query, cands), args.requests)
            t_direct = _time(lambda: direct.hydrate(query, cands), args.requests)
            t_floor = _time(floor, args.requests)
            print(f"hydration of 1 user + {len(cands)} posts (+ their authors), cold, {args.requests} requests "
                  f"({len(reads)} hashes, {n_values} values), ms:")
            for name, t in (("feast_sdk", t_sdk), ("feast_layout", t_direct), ("floor_hmget", t_floor)):
                print(f"  {name:13s} p50 {np.percentile(t, 50):8.2f}   p99 {np.percentile(t, 99):8.2f}")
            print(f"  ratio sdk/direct: p50 {np.percentile(t_sdk, 50) / np.percentile(t_direct, 50):.1f}x   "
                  f"p99 {np.percentile(t_sdk, 99) / np.percentile(t_direct, 99):.1f}x")
            print(f"  HEADLINE direct/floor: p50 {np.percentile(t_direct, 50) / np.percentile(t_floor, 50):.2f}x   "
                  f"p99 {np.percentile(t_direct, 99) / np.percentile(t_floor, 99):.2f}x (target <= 1.3x)")
            client.close()
        finally:
            srv.stop()


if __name__ == "__main__":
    main()
