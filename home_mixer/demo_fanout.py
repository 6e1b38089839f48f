"""The demo's fan-out stage: KuaiRand's follow graph into Redis, the catalogue's post-created events
replayed through real fan-out worker processes, and what they did (lag, deliveries, celebrities).

KuaiRand's largest author has about 500 followers in the demo graph (``pipelines.graph.kuairand``),
far below the production threshold of 10,000, so the demo lowers ``fanout.celebrity_threshold`` to
``DEMO_CELEBRITY_THRESHOLD``: the ~80 authors above it are pulled at read, every other author is
pushed, and the in-network source (``read: timeline``) shows both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from core.online_store import connect
from core import online_layout as keys
from core.services import stop_tree
from core.state import StateDir
from monitoring.scrape import MetricsSnapshot
from pipelines.graph.config import load_fanout_config
from pipelines.graph.edges import write_follow_graph
from pipelines.graph.kuairand import kuairand_follow_graph, post_created_events
from pipelines.graph.metrics import record_name
from pipelines.graph.store import SocialGraphStore
from pipelines.streaming.bus import RedisStreamsBus

DEMO_CELEBRITY_THRESHOLD = 100  # followers; KuaiRand's graph peaks near 500 (module docstring)
FANOUT_WORKERS = 2
CONSUMER = "demo-fanout"
POST_RATE = 1000.0  # posts/s offered: KuaiRand's 3 upload days replayed in ~8 s
PUBLISH_BATCH = 50
CONFIG_NAME = "demo-fanout.yaml"


@dataclass
class FanoutStageResult:
    """What ``fanout_stage`` did: ``lines`` to print, ``celebrities`` (author ids above the
    threshold, pulled at read), ``config`` (the ``fanout:`` YAML the workers ran with)."""

    lines: list[str] = field(default_factory=list)
    celebrities: set[int] = field(default_factory=set)
    config: Path | None = None
    showcase_users: list[int] = field(default_factory=list)


def fanout_stage(state: StateDir, redis_url: str, as_of, *, workers: int = FANOUT_WORKERS,
                 threshold: int = DEMO_CELEBRITY_THRESHOLD, post_rate: float = POST_RATE,
                 timeout_s: float = 180.0) -> FanoutStageResult:
    """Build and load the graph, start ``workers`` fan-out processes (``home-mixer fanout run``),
    publish one ``PostCreatedEvent`` per post created before ``as_of`` in creation order at
    ``post_rate`` posts/s (an absolute schedule, in batches of ``PUBLISH_BATCH``), wait until
    the group's backlog is empty, read the workers' ``/metrics`` and stop them.

    The graph and timelines of an earlier run are cleared first, so a second demo run fans out again.
    Lag is reported from the bus (``hm_fanout_delivery_lag_seconds``): the posts were created weeks
    before the log ends, so created -> written would measure the calendar, not the fan-out.

    Raises:
        FileNotFoundError: the canonical ``social_edges`` / ``posts`` tables are missing.
        RuntimeError: the workers did not start or did not drain the posts within ``timeout_s``
            (their log is named).
    """
    tables = {name: state.table(name) for name in ("social_edges", "posts")}
    for name, path in tables.items():
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: build the canonical tables first (home-mixer features build)")
    out = FanoutStageResult()
    client = connect(redis_url)
    store = SocialGraphStore(client)
    cleared = store.clear()
    edges = kuairand_follow_graph(pd.read_parquet(tables["social_edges"]), as_of=as_of)
    follower, followee = edges["user_id"].to_numpy(np.int64), edges["author_id"].to_numpy(np.int64)
    write_follow_graph(state, follower, followee, "kuairand")
    store.load_edges(follower, followee)
    followers = edges.groupby("author_id").size()
    out.celebrities = {int(a) for a in followers.index[followers > threshold]}
    share = float(followers[followers > threshold].sum() / max(len(edges), 1))
    out.lines.append(f"  graph: {len(edges):,} follow edges (explicit follows + engaged authors, "
                     f"pipelines/graph/kuairand.py) over {edges['user_id'].nunique():,} users and {len(followers):,} "
                     f"authors ({cleared:,} keys of an earlier run cleared); {len(out.celebrities)} authors have more "
                     f"than {threshold} followers ({share:.0%} of the edges): pulled at read, the rest pushed")

    out.config = state.run / CONFIG_NAME
    out.config.parent.mkdir(parents=True, exist_ok=True)
    out.config.write_text(yaml.safe_dump({"fanout": {"celebrity_threshold": threshold}}))
    settings = load_fanout_config(out.config)
    client.delete(keys.event_stream(settings.post_topic))  # an earlier run's posts and group
    posts = pd.read_parquet(tables["posts"])
    cut = pd.Timestamp(as_of)
    posts = posts[posts["created_ts"] <= (cut.tz_localize("UTC") if cut.tzinfo is None else cut)]
    events = post_created_events(posts)
    out.showcase_users = _showcase_users(edges, out.celebrities, set(posts["author_id"].astype("int64")))

    log_path = state.run / "demo-fanout-workers.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # ``fanout run --workers N`` names its processes <consumer>-<i>; one worker runs as <consumer>
    consumers = [CONSUMER] if workers == 1 else [f"{CONSUMER}-{i}" for i in range(workers)]
    names = [record_name(c) for c in consumers]
    for name in names:
        (state.run / f"{name}.json").unlink(missing_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "home_mixer.cli", "--state", str(state.root), "fanout", "run",
                                 "--workers", str(workers), "--consumer", CONSUMER, "--config", str(out.config),
                                 "--metrics-port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, HOME_MIXER_REDIS_URL=redis_url))
    try:
        urls = _wait_endpoints(state, names, proc, log_path, deadline=time.monotonic() + 60)
        bus = RedisStreamsBus(client)
        t0 = time.perf_counter()
        for i in range(0, len(events), PUBLISH_BATCH):
            # an absolute schedule at ``post_rate``: sleep overshoot does not accumulate
            time.sleep(max(t0 + i / post_rate - time.perf_counter(), 0.0))
            bus.publish_many([(settings.post_topic, e) for e in events[i:i + PUBLISH_BATCH]])
        published_s = time.perf_counter() - t0
        deadline = time.monotonic() + timeout_s
        while True:
            b = bus.backlog(settings.post_topic, settings.group)
            if b.lag == 0 and b.pending == 0:
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"fan-out workers left lag {b.lag}, {b.pending} pending after {timeout_s:.0f} s "
                                   f"(exit code {proc.poll()}); see {log_path}")
            time.sleep(0.05)
        drained_s = time.perf_counter() - t0
        snap = MetricsSnapshot.scrape(urls)
    finally:
        stop_tree(proc.pid)
        client.close()
    posts_n = len(events)
    deliveries = snap.value("hm_fanout_deliveries_total")
    p50, p99 = (snap.histogram_quantile("hm_fanout_delivery_lag_seconds", q) * 1e3 for q in (0.5, 0.99))
    out.lines += [
        f"  {workers} fan-out worker process(es) ({', '.join(consumers)}); {posts_n:,} post-created events "
        f"(KuaiRand's upload times, in creation order) replayed at {posts_n / max(published_s, 1e-9):,.0f} posts/s "
        f"in {published_s:.1f} s; the last fanned out {drained_s - published_s:.2f} s after the last published",
        f"  outcomes: {int(snap.value('hm_fanout_posts_total', outcome='fanned_out')):,} pushed, "
        f"{int(snap.value('hm_fanout_posts_total', outcome='celebrity_skipped')):,} celebrity posts skipped (pulled "
        f"at read); {int(deliveries):,} home-timeline entries written ({deliveries / max(posts_n, 1):.1f} per post)",
        f"  fan-out lag, bus -> last follower written: p50 {p50:.0f} ms, p99 {p99:.0f} ms (histogram buckets, "
        f"interpolated; the posts were created weeks before the log ends, so created -> written is not shown)",
    ]
    return out


def _showcase_users(edges: pd.DataFrame, celebrities: set[int], posting: set[int], n: int = 30) -> list[int]:
    """Up to ``n`` users following at least one celebrity and one pushed author who has posts, the
    most such followees first (ties by id)."""
    e = edges[edges["author_id"].isin(posting)]
    celeb = e["author_id"].isin(celebrities)
    both = pd.DataFrame({"celeb": celeb.groupby(e["user_id"]).sum(), "pushed": (~celeb).groupby(e["user_id"]).sum()})
    both = both[(both["celeb"] > 0) & (both["pushed"] > 0)]
    both = both.assign(total=both["celeb"] + both["pushed"]).reset_index()
    return both.sort_values(["total", "user_id"], ascending=[False, True])["user_id"].head(n).astype(int).tolist()


def _wait_endpoints(state: StateDir, names: list[str], proc: subprocess.Popen, log_path: Path,
                    deadline: float) -> list[str]:
    """The workers' ``/metrics`` URLs once each has recorded its endpoint."""
    while True:
        files = [state.run / f"{n}.json" for n in names]
        if all(f.exists() for f in files):
            recs = [json.loads(f.read_text()) for f in files]
            return [f"http://{r['fields']['host']}:{r['ports']['metrics_port']}/metrics" for r in recs]
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"fan-out workers did not start (exit code {proc.poll()}); see {log_path}:\n"
                               + log_path.read_text()[-2000:])
        time.sleep(0.1)


def showcase_timeline(redis_url: str, users: list[int], now_s: float, rows: int = 12) -> tuple[int | None, list[str]]:
    """Among ``users`` (``FanoutStageResult.showcase_users``, at most 30 read), the one whose home
    timeline, read as the in-network source reads it (``HomeTimelineReader``, celebrity pulls on,
    nothing cleaned), has both pushed and pulled posts and the most posts; returns that user and the
    lines to print (the newest ``rows`` posts, each marked pushed or pulled), or ``(None, [])``."""
    from pipelines.graph.timeline import HomeTimelineReader

    client = connect(redis_url)
    try:
        reader, best = HomeTimelineReader(client), None
        for uid in users[:30]:
            got = reader.read(int(uid), 500, until=now_s, max_celebrity_pulls=50, cleanup=False)
            if got.pulled and len(got.pulled) < len(got.entries) and (best is None or len(got.entries) > len(best[1].entries)):
                best = (int(uid), got)
    finally:
        client.close()
    if best is None:
        return None, []
    uid, got = best
    lines = [f"Home timeline of user {uid} as the in-network source reads it: {len(got.entries)} posts, "
             f"{len(got.entries) - len(got.pulled)} pushed by fan-out, {len(got.pulled)} pulled from "
             f"{len(got.celebrities)} followed celebrities",
             f"{'post':>8} {'author':>9} {'created (UTC)':>17}  via"]
    for e in got.entries[:rows]:
        when = pd.Timestamp(e.created_ts, unit="s", tz="UTC").strftime("%Y-%m-%d %H:%M")
        lines.append(f"{e.post_id:>8} {e.author_id:>9} {when:>17}  {'pulled' if e.post_id in got.pulled else 'pushed'}")
    return uid, lines


def format_in_network(resp: dict) -> str:
    """One line per page: how many in-network items came pushed (home timeline) and pulled
    (followed celebrities), e.g. ``in-network 5 of 20: 3 pushed, 2 pulled``."""
    items = [it for it in resp["items"] if it["source"] == "in_network"]
    pushed = sum(it.get("source_detail") == "pushed" for it in items)
    pulled = sum(it.get("source_detail") == "pulled" for it in items)
    return f"in-network {len(items)} of {len(resp['items'])}: {pushed} pushed, {pulled} pulled"
