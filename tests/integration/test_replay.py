"""Integration tests of the log replay into real Redis Streams (real KuaiRand log slice)."""

from __future__ import annotations

import pandas as pd
import pytest

from core import online_layout as keys
from core.schema import RAW_LABEL_COLUMNS
from pipelines.raw import LOG_DTYPES, LOG_FILE, VIDEOS_DTYPES, VIDEOS_FILE, read_csv_typed
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import parse_event
from pipelines.streaming.replay import LogReplayer, main

pytestmark = pytest.mark.integration

N_ROWS = 2_000


@pytest.fixture(scope="module")
def real_slice(data_dir):
    log = pd.read_csv(data_dir / LOG_FILE, nrows=N_ROWS, dtype=LOG_DTYPES)
    videos = read_csv_typed(data_dir / VIDEOS_FILE, VIDEOS_DTYPES)
    return log, videos


def _expected_events(log, videos):
    """Independent count: dedup on (user, video, time), drop unknown videos, 1 + positives + follows."""
    rows = log.drop_duplicates(["user_id", "video_id", "time_ms"]).merge(
        videos[["video_id", "author_id"]], on="video_id", how="inner")
    labels = sum(int(rows[c].sum()) for c in RAW_LABEL_COLUMNS)
    follows = int(((rows["is_follow"] == 1) & (rows["user_id"] != rows["author_id"])).sum())
    return len(rows), len(rows) + labels + follows


def test_replay_real_log_slice_into_redis(redis_client, real_slice):
    log, videos = real_slice
    bus = RedisStreamsBus(redis_client)
    stats = LogReplayer(bus, topic="engagements", speed=0, time_mode="log").replay(log, videos)
    n_rows, n_events = _expected_events(log, videos)
    assert stats.rows == n_rows and stats.events_published == n_events
    entries = redis_client.xrange(keys.event_stream("engagements"))
    assert len(entries) == n_events
    events = [parse_event(f) for _, f in entries]
    ts = [e.event_ts for e in events]
    assert ts == sorted(ts)
    assert len({e.event_id for e in events}) == n_events  # ids unique -> idempotent downstream
    # Consumers see the same events through the bus.
    got = bus.consume("engagements", "g", "c1", count=n_events + 10)
    assert [d.event for d in got] == events


def test_rerun_gives_same_ids(redis_client, real_slice):
    log, videos = real_slice
    bus = RedisStreamsBus(redis_client)
    LogReplayer(bus, speed=0).replay(log, videos, limit=200)
    LogReplayer(bus, speed=0).replay(log, videos, limit=200)
    ids = [parse_event(f).event_id for _, f in redis_client.xrange(keys.event_stream("engagements"))]
    half = len(ids) // 2
    assert half > 200 and ids[:half] == ids[half:]


def test_pacing_60_log_seconds_at_speed_60_take_about_1s(redis_client):
    t0 = 1_650_812_741_000
    # 61 rows one log second apart: spans 60 log seconds.
    log = pd.DataFrame([{**{c: 0 for c in LOG_DTYPES}, "user_id": i, "video_id": 7, "time_ms": t0 + 1000 * i,
                         "date": 20220425, "is_click": i % 2} for i in range(61)]).astype(LOG_DTYPES)
    videos = pd.DataFrame({"video_id": [7], "author_id": [1_000]})
    stats = LogReplayer(RedisStreamsBus(redis_client), speed=60.0).replay(log, videos)
    assert stats.log_seconds == 60.0
    assert 0.8 <= stats.wall_seconds <= 3.0, stats
    assert 20 <= stats.achieved_speed <= 75
    assert redis_client.xlen(keys.event_stream("engagements")) == 61 + 30


def test_cli_replays_limit(redis_server, redis_client, data_dir, capsys):
    rc = main(["--log", str(data_dir / LOG_FILE), "--data-dir", str(data_dir), "--speed", "0",
               "--redis-url", redis_server.url, "--limit", "100", "--topic", "cli"])
    assert rc == 0
    out = capsys.readouterr().out
    assert '"rows": 100' in out
    assert redis_client.xlen(keys.event_stream("cli")) >= 100


def test_cli_bad_redis_url_is_clear(capsys):
    rc = main(["--redis-url", "redis://127.0.0.1:1/0", "--limit", "1"])
    assert rc == 2 and "cannot reach Redis" in capsys.readouterr().err
