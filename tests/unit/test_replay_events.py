"""Unit tests of the log replay's row/event building and pacing (recording bus, fake clock)."""

from __future__ import annotations

import pandas as pd
import pytest

from core.schema import HEADS, RAW_LABEL_COLUMNS
from pipelines.raw import LOG_DTYPES
from pipelines.streaming.events import EngagementEvent, SocialGraphEvent
from pipelines.streaming.replay import LogReplayer, ReplayPacer, ReplayRowsBuilder

T0 = 1_650_812_741_000  # 2022-04-24T15:05:41Z, epoch ms


def _row(user, video, t_ms, **labels):
    row = {c: 0 for c in LOG_DTYPES}
    row.update(user_id=user, video_id=video, time_ms=t_ms, date=20220425)
    row.update(labels)
    return row


@pytest.fixture()
def crafted():
    log = pd.DataFrame([
        _row(1, 100, T0, is_click=1, long_view=1),
        _row(1, 100, T0, is_click=1, long_view=1),            # exact duplicate: dropped
        _row(2, 101, T0 + 1_000, is_follow=1, is_like=1),      # follow -> also a SocialGraphEvent
        _row(3, 102, T0 + 2_000),                              # impression only
        _row(4, 999, T0 + 3_000, is_click=1),                  # unknown video: dropped
        _row(20, 101, T0 + 4_000, is_follow=1),                # follows themselves: no social event
        _row(5, 100, T0 + 5_000, is_comment=1, is_forward=1, is_hate=1),
    ]).astype(LOG_DTYPES)
    videos = pd.DataFrame({"video_id": [100, 101, 102], "author_id": [10, 20, 30]})
    return log, videos


class RecordingBus:
    def __init__(self):
        self.published = []

    def publish(self, topic, event):
        self.published.append((topic, event))
        return f"{len(self.published)}-0"

    def publish_many(self, items):
        return [self.publish(t, e) for t, e in items]


def _expected_kinds(log, videos):
    known = log.drop_duplicates(["user_id", "video_id", "time_ms"])
    known = known[known["video_id"].isin(videos["video_id"])].merge(videos, on="video_id")
    counts = {"impression": len(known)}
    for raw, head in RAW_LABEL_COLUMNS.items():
        counts[head] = int(known[raw].sum())
    counts["social_follow"] = int(((known["is_follow"] == 1) & (known["user_id"] != known["author_id"])).sum())
    return {k: v for k, v in counts.items() if v}


def test_events_counts_ids_authors_follows(crafted):
    log, videos = crafted
    bus = RecordingBus()
    stats = LogReplayer(bus, topic="eng", speed=0, time_mode="log").replay(log, videos)
    assert stats.rows == 5 and stats.dropped_duplicates == 1 and stats.unknown_video_rows == 1
    assert stats.events_by_kind == _expected_kinds(log, videos)
    assert stats.events_published == len(bus.published) == sum(stats.events_by_kind.values())
    authors = dict(zip(videos["video_id"], videos["author_id"]))
    for topic, ev in bus.published:
        assert topic == "eng"
        if isinstance(ev, EngagementEvent):
            assert ev.author_id == authors[ev.post_id]
            ms = int(ev.event_ts.timestamp() * 1000)
            assert ev.event_id == f"{ev.user_id}:{ev.post_id}:{ms}:{ev.kind}"
    social = [e for _, e in bus.published if isinstance(e, SocialGraphEvent)]
    assert [(e.user_id, e.author_id, e.action) for e in social] == [(2, 20, "follow")]
    assert social[0].event_id == f"2:101:{T0 + 1000}:social_follow"
    ts = [e.event_ts for _, e in bus.published]
    assert ts == sorted(ts) and ts[0] == pd.Timestamp(T0, unit="ms", tz="UTC")
    ids = [e.event_id for _, e in bus.published]
    assert len(set(ids)) == len(ids)


def test_replay_is_deterministic(crafted):
    log, videos = crafted
    a, b = RecordingBus(), RecordingBus()
    LogReplayer(a, speed=0, time_mode="log").replay(log, videos)
    LogReplayer(b, speed=0, time_mode="log").replay(log, videos)
    assert [e.model_dump_json() for _, e in a.published] == [e.model_dump_json() for _, e in b.published]


def test_live_mode_stamps_publish_time_and_keeps_log_ids(crafted):
    log, videos = crafted
    ticks = iter(range(1_800_000_000, 1_800_000_100))
    live, logged = RecordingBus(), RecordingBus()
    LogReplayer(live, speed=0, wall_clock=lambda: float(next(ticks))).replay(log, videos)
    LogReplayer(logged, speed=0, time_mode="log").replay(log, videos)
    assert [e.event_id for _, e in live.published] == [e.event_id for _, e in logged.published]
    stamps = [e.event_ts.timestamp() for _, e in live.published]
    assert stamps == sorted(stamps) and stamps[0] == 1_800_000_000
    # one stamp per log row: a row's impression, engagements and follow share it
    assert len(set(stamps)) == 5
    with pytest.raises(ValueError, match="time_mode"):
        LogReplayer(live, time_mode="wall")


def test_social_topic_separate(crafted):
    log, videos = crafted
    bus = RecordingBus()
    LogReplayer(bus, topic="eng", social_topic="soc", speed=0).replay(log, videos)
    assert {t for t, e in bus.published if isinstance(e, SocialGraphEvent)} == {"soc"}
    assert {t for t, e in bus.published if isinstance(e, EngagementEvent)} == {"eng"}


def test_filters_and_limit(crafted):
    log, videos = crafted
    b = ReplayRowsBuilder()
    start = pd.Timestamp(T0 + 1_000, unit="ms", tz="UTC")
    end = pd.Timestamp(T0 + 5_000, unit="ms", tz="UTC")
    rows = b.build(log, videos, start=start, end=end)
    assert rows.time_ms.tolist() == [T0 + 1_000, T0 + 2_000, T0 + 4_000]  # end exclusive, unknown video gone
    assert b.build(log, videos, start=start, limit=2).time_ms.tolist() == [T0 + 1_000, T0 + 2_000]
    assert len(b.build(log, videos, limit=0)) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"start": "2022-04-25T00:00:00"}, "no timezone"),
    ({"start": "2022-04-26T00:00:00Z", "end": "2022-04-25T00:00:00Z"}, "before end"),
    ({"limit": -1}, "limit"),
])
def test_bad_filters_raise(crafted, kwargs, match):
    log, videos = crafted
    with pytest.raises(ValueError, match=match):
        ReplayRowsBuilder().build(log, videos, **kwargs)


def test_bad_log_raises(crafted):
    log, videos = crafted
    with pytest.raises(ValueError, match="missing columns"):
        ReplayRowsBuilder().build(log.drop(columns=["is_hate"]), videos)
    with pytest.raises(ValueError, match="must be 0/1"):
        ReplayRowsBuilder().build(log.assign(is_click=2), videos)
    with pytest.raises(ValueError, match="speed"):
        ReplayPacer(-1)


class FakeClock:
    """Monotonic clock whose sleeps overshoot by 30 ms, to show the schedule does not drift."""

    def __init__(self):
        self.now = 100.0
        self.sleeps = []

    def __call__(self):
        return self.now

    def sleep(self, s):
        self.sleeps.append(s)
        self.now += s + 0.03


def test_pacer_schedules_relative_to_start_without_drift():
    clock = FakeClock()
    pacer = ReplayPacer(speed=10.0, tick_s=0.05, clock=clock, sleep=clock.sleep)
    t = pd.Series([0, 0, 100, 1_000, 2_000, 3_000, 10_000]).to_numpy() + T0  # ms
    starts = []
    for sl in pacer.batches(t):
        starts.append((sl.start, sl.stop, round(clock.now - 100.0, 3)))
    # Rows 0-2 are due within tick_s (0 and 0.01 s), then one batch per second of log / 10.
    assert [(a, b) for a, b, _ in starts] == [(0, 3), (3, 4), (4, 5), (5, 6), (6, 7)]
    # Each batch starts at its due time + at most one overshoot (0.03 s), never accumulated.
    for (a, _, at), due in zip(starts, [0.0, 0.1, 0.2, 0.3, 1.0]):
        assert due <= at <= due + 0.031, (a, at, due)


def test_pacer_unpaced_never_sleeps():
    clock = FakeClock()
    pacer = ReplayPacer(speed=0, clock=clock, sleep=clock.sleep)
    t = (pd.Series(range(2_500)) * 60_000 + T0).to_numpy()
    sl = list(pacer.batches(t, max_batch=1000))
    assert [(s.start, s.stop) for s in sl] == [(0, 1000), (1000, 2000), (2000, 2500)] and clock.sleeps == []


def test_stop_event_ends_the_replay_after_the_current_batch(crafted):
    import threading

    log, videos = crafted
    bus, stop = RecordingBus(), threading.Event()
    replayer = LogReplayer(bus, speed=0, time_mode="log")
    replayer.pacer.batches = lambda t, max_batch=1000: iter([slice(0, 2), slice(2, 4), slice(4, len(t))])
    stats = replayer.replay(log, videos, on_rows=lambda n: stop.set(), stop=stop)
    assert stats.rows == 2 and stats.events_published == len(bus.published) > 0
    rows = {(e.user_id, e.post_id) for _, e in bus.published if isinstance(e, EngagementEvent)}
    assert len(rows) == 2 and stats.last_ts_ms >= stats.first_ts_ms
