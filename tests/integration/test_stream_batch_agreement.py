"""Batch/stream agreement (issue 4, item 6): the same replayed log gives the same window counts
from the Spark content features and from the stream processor's Redis buckets.

Both sides get one real slice of KuaiRand-Pure: 30 h from 2022-04-25T12:00Z, across the local
(UTC+8) day boundary at 16:00Z and the UTC one at 00:00Z, restricted to a fixed set of posts
(the busiest ones plus a random sample of quiet ones). Content features are per post, so dropping
the other posts changes no count of the kept ones; it keeps the slice to ~3.2k log rows (3.0k
impressions of 80 posts) while the 24 h window still fills up and drains.

- batch: the production steps of the content table: ``build_canonical`` on the raw slice, then the
  content job exactly as ``build_offline_features`` runs it (``content_features`` on the canonical
  tables read by Spark, ``base_row_ts``, ``write_feature_table``); the rows stamped at an hour H
  (``post_{kind}_{1h,24h}`` = events in ``[H - W, H)``). The other three views are skipped (they
  take ~20 s and are not compared).
- stream: ``LogReplayer(time_mode="log", speed=0)`` -> ``RedisStreamsBus`` -> ``StreamProcessor``,
  read with ``RealtimeFeatureReader.post_window_counts(posts, H)`` (``rt_{kind}_{1h,24h}``).

Two ways of meeting at H, both checked:

1. online (``test_incremental_replay_matches_batch_at_each_hour_boundary``): only the events with
   log time < H have been replayed when the stream is read at H, as when the mixer asks at H.
   Checkpoints lie before, at and after the day boundaries and past 24 h, so the 24 h window also
   drains and the processor's pruning (newest event - 24 h) has run.
2. backfill (``test_full_replay_windows_exclude_later_events``): the whole slice is in Redis and
   earlier hours are read; then the window itself must leave out the buckets at or after H. Only
   windows within the stream's 24 h retention can be compared this way (older buckets are pruned),
   i.e. the 1 h window at the last 24 hours and the 24 h window at the end of the slice.

The first is what serving sees and checks both windows at every checkpoint, but it cannot see a
window that wrongly includes the bucket starting at H (nothing at or after H is in Redis yet); the
second catches exactly that, and checks the read-side window arithmetic at many more hours.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from core import realtime as rt
from core.schema import CONTENT_VIEW
from core.state import StateDir
from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader
from pipelines.canonical import build_canonical
from pipelines.features import RatePriors
from pipelines.features.common import base_row_ts, read_table, write_feature_table
from pipelines.features.content import KINDS, content_features
from pipelines.raw import load_raw
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.processor import StreamProcessor
from pipelines.streaming.replay import LogReplayer

pytestmark = pytest.mark.integration

START = pd.Timestamp("2022-04-25T12:00:00Z")
END = pd.Timestamp("2022-04-26T18:00:00Z")  # exclusive; the batch grid ends here too
HOUR = pd.Timedelta(hours=1)
# 16:00Z = local midnight (UTC+8) of 04-26; 00:00Z = UTC midnight; 13:00Z / 17:00Z on 04-26 are
# 25 h / 29 h into the slice, when the first hours have left the 24 h window.
CHECKPOINTS = [pd.Timestamp(t) for t in ("2022-04-25T15:00Z", "2022-04-25T16:00Z", "2022-04-25T17:00Z",
                                         "2022-04-26T00:00Z", "2022-04-26T13:00Z", "2022-04-26T17:00Z")] + [END]
BUSY_POSTS, QUIET_POSTS, SEED = 40, 40, 11
WINDOWS = ("1h", "24h")  # the windows both sides have (the stream has no 7 d, the batch no 5 m)
# Batch kind (content.KINDS key) -> stream event kind: "clicks" counts impressions with click = 1,
# which the replay publishes as one "click" event.
STREAM_KIND = {k: head or "impression" for k, head in KINDS.items()}
PRIORS = RatePriors(click=0.4, long_view=0.3, like=0.02, follow=0.01, hate=0.005, engaged=0.45,
                    period="fixed (rates are not compared)")


def _post_sample(log: pd.DataFrame) -> np.ndarray:
    """The busiest ``BUSY_POSTS`` videos of the slice plus ``QUIET_POSTS`` random other ones."""
    counts = log["video_id"].value_counts().sort_index(kind="stable").sort_values(ascending=False, kind="stable")
    busy = counts.index[:BUSY_POSTS].to_numpy()
    quiet = np.random.default_rng(SEED).choice(counts.index[BUSY_POSTS:].to_numpy(), QUIET_POSTS, replace=False)
    return np.concatenate([busy, quiet])


@pytest.fixture(scope="module")
def agreement_slice(spark, data_dir, tmp_path_factory):
    """The raw slice (log + videos) and the batch content features built from it.

    Returns ``{"log", "videos", "impressions" (canonical, pandas), "content" (feature rows)}``.
    """
    raw = load_raw(data_dir)
    t = pd.to_datetime(raw.log["time_ms"], unit="ms", utc=True)
    log = raw.log[(t >= START) & (t < END)]
    log = log[log["video_id"].isin(_post_sample(log))].reset_index(drop=True)
    state = StateDir(tmp_path_factory.mktemp("agreement")).ensure()
    build_canonical(dataclasses.replace(raw, log=log), state)
    # the content job of pipelines.features.runner.build_offline_features, step by step
    spark_imp, spark_posts = read_table(spark, state, "impressions"), read_table(spark, state, "posts")
    write_feature_table(content_features(spark_imp, spark_posts, PRIORS, base_row_ts(spark_imp)), CONTENT_VIEW, state)
    content = pd.read_parquet(state.table(CONTENT_VIEW.table))
    impressions = pd.read_parquet(state.table("impressions"))
    assert 2_000 <= len(impressions) <= 6_000, "slice size drifted; adjust BUSY_POSTS / QUIET_POSTS"
    return {"log": log, "videos": raw.videos, "impressions": impressions, "content": content}


def _drain(proc: StreamProcessor, bus: RedisStreamsBus) -> None:
    """Apply everything published so far; fail if anything is left behind."""
    while proc.run_once(count=2_000) > 0:
        pass
    backlog = bus.backlog(proc.topic, proc.group)
    assert (backlog.lag, backlog.pending, backlog.dead_letters) == (0, 0, 0)
    assert proc.stats["failed"] == 0


def _compare(content: pd.DataFrame, reader: RealtimeFeatureReader, at: pd.Timestamp,
             windows=WINDOWS) -> tuple[list, int, dict]:
    """Compare the batch rows stamped ``at`` with the stream's windows ending at ``at``.

    Returns (mismatches ``(H, post, feature, batch, stream)``, values compared,
    non-zero values per ``(kind, window)``).
    """
    rows = content[content["event_timestamp"] == at].set_index("post_id")
    stream = reader.post_window_counts(rows.index.tolist(), at.timestamp())
    mismatches, compared, nonzero = [], 0, {}
    for post, row in rows.iterrows():
        for kind, stream_kind in STREAM_KIND.items():
            for w in windows:
                batch_v, stream_v = int(row[f"post_{kind}_{w}"]), stream[post][rt.feature_name(stream_kind, w)]
                compared += 1
                nonzero[(kind, w)] = nonzero.get((kind, w), 0) + (batch_v != 0)
                if batch_v != stream_v:
                    mismatches.append((str(at), post, f"{kind}_{w}", batch_v, stream_v))
    return mismatches, compared, nonzero


def _replayer_and_processor(redis_client):
    bus = RedisStreamsBus(redis_client)
    return bus, LogReplayer(bus, speed=0, time_mode="log"), StreamProcessor(redis_client, bus, consumer="agree")


def test_incremental_replay_matches_batch_at_each_hour_boundary(agreement_slice, redis_client):
    log, videos, content = agreement_slice["log"], agreement_slice["videos"], agreement_slice["content"]
    imp = agreement_slice["impressions"]
    bus, replayer, proc = _replayer_and_processor(redis_client)
    reader = RealtimeFeatureReader(redis_client)
    mismatches, compared, nonzero, posts_seen = [], 0, {}, set()
    replayed, previous, drained_24h = 0, START, False
    for at in CHECKPOINTS:
        replayed += replayer.replay(log, videos, start=previous, end=at).rows  # log time in [previous, at)
        _drain(proc, bus)
        previous = at
        assert replayed == (imp["event_ts"] < at).sum()  # the stream holds exactly the events before H
        bad, n, nz = _compare(content, reader, at)
        mismatches += bad
        compared += n
        nonzero = {k: nonzero.get(k, 0) + v for k, v in nz.items()}
        rows = content[content["event_timestamp"] == at]
        posts_seen |= set(rows["post_id"])
        # some post has events before H that already left the 24 h window (the drain is tested)
        drained_24h |= bool((rows["post_impressions_24h"] < rows["post_impressions_total"]).any())
    assert not mismatches, f"{len(mismatches)} of {compared} values differ, e.g. {mismatches[:10]}"
    assert replayed == len(imp)
    assert len(posts_seen) == imp["post_id"].nunique() >= 60
    assert compared >= 2_000 and sum(nonzero.values()) >= 1_000, (compared, nonzero)
    assert all(v > 0 for v in nonzero.values()) and len(nonzero) == len(KINDS) * len(WINDOWS), nonzero
    assert drained_24h


def test_full_replay_windows_exclude_later_events(agreement_slice, redis_client):
    log, videos, content = agreement_slice["log"], agreement_slice["videos"], agreement_slice["content"]
    bus, replayer, proc = _replayer_and_processor(redis_client)
    replayer.replay(log, videos)
    _drain(proc, bus)
    reader = RealtimeFeatureReader(redis_client)
    # Buckets older than a post's newest event - 24 h are pruned; the newest event is < END, so
    # every bucket from END - 24 h on is kept: the 1 h windows of hours >= END - 23 h are whole.
    hours = pd.date_range(END - 23 * HOUR, END - HOUR, freq="h")
    mismatches, compared, nonzero_1h = [], 0, 0
    for at in hours:
        bad, n, nz = _compare(content, reader, at, windows=("1h",))
        mismatches += bad
        compared += n
        nonzero_1h += sum(nz.values())
    bad, n, nz = _compare(content, reader, END)
    mismatches += bad
    compared += n
    imp = agreement_slice["impressions"]
    later_events = int((imp["event_ts"] >= hours[0]).sum())
    assert not mismatches, f"{len(mismatches)} of {compared} values differ, e.g. {mismatches[:10]}"
    assert compared >= 2_000 and nonzero_1h >= 500, (compared, nonzero_1h)
    assert all(nz[(k, "24h")] > 0 for k in KINDS), nz  # likes are rare: the 1 h window may hold none
    assert later_events > 1_000  # reading the earlier hours, most events in Redis were later ones
