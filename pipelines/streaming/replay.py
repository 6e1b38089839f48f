"""Replay an impression log (KuaiRand-Pure schema) into the event bus as a live event stream.

Per log row, after ``pipelines.canonical.deduplicate_log`` and the author join of
``pipelines.canonical.impressions_table`` (rows whose video is unknown are dropped and counted):

- one ``EngagementEvent`` ``kind="impression"``,
- one ``EngagementEvent`` per positive label (``schema.RAW_LABEL_COLUMNS`` -> ``schema.HEADS``),
- one ``SocialGraphEvent`` ``action="follow"`` if ``is_follow == 1`` (unless user == author).

``event_ts``: with ``time_mode="live"`` (default) the wall-clock time the event is published, as a
live producer would stamp it, so event->online lag and the mixer's windows (evaluated at wall time)
mean what they mean in production; with ``time_mode="log"`` the row's log time (a backfill, or a
comparison with the batch features of the same log). Event ids are
``f"{user_id}:{post_id}:{log_time_ms}:{kind}"`` (the follow edge: ``...:social_follow``) in both
modes, so a second replay of the same log is idempotent downstream.

Pacing: ``speed`` log seconds per wall second (60 -> one log minute per wall second; ``0``/``None``
-> as fast as possible). Each row is due at ``start + (t_row - t_first) / speed`` on a monotonic
clock, always relative to the start, so sleep overshoot never accumulates (no drift). Rows due
within ``tick_s`` of each other are published as one batch after one sleep.

CLI: ``python -m pipelines.streaming.replay --log PATH --speed 60 --redis-url URL [--limit N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd

from core.online_store import connect
from core.schema import RAW_LABEL_COLUMNS
from pipelines.canonical import deduplicate_log, impressions_table
from pipelines.raw import LOG_DTYPES, LOG_FILE, VIDEOS_DTYPES, VIDEOS_FILE, read_csv_typed
from pipelines.streaming.bus import AnyEvent, EventBus
from pipelines.streaming.events import EngagementEvent, SocialGraphEvent

_HEADS = tuple(RAW_LABEL_COLUMNS.values())  # label column order of the canonical impressions
FOLLOW_ID_SUFFIX = "social_follow"


def event_id(user_id: int, post_id: int, time_ms: int, kind: str) -> str:
    """Deterministic event id ``"{user_id}:{post_id}:{time_ms}:{kind}"`` (time_ms = epoch ms)."""
    return f"{user_id}:{post_id}:{time_ms}:{kind}"


@dataclass(frozen=True)
class ReplayRows:
    """The rows to replay, time-ordered, as numpy int64 arrays (one element per row).

    ``time_ms`` is epoch milliseconds; ``labels[head]`` is 0/1 per ``schema.HEADS`` head;
    ``dropped_duplicates`` / ``unknown_video_rows`` count rows removed before filtering.
    """

    user_id: np.ndarray
    post_id: np.ndarray
    author_id: np.ndarray
    time_ms: np.ndarray
    labels: dict[str, np.ndarray]
    dropped_duplicates: int = 0
    unknown_video_rows: int = 0

    def __len__(self) -> int:
        return len(self.time_ms)


def _to_ms(value: datetime | pd.Timestamp | str | None, name: str) -> int | None:
    if value is None:
        return None
    ts = pd.Timestamp(value)
    if ts.tzinfo is None:
        raise ValueError(f"{name}={value!r} has no timezone; give e.g. '2022-04-25T08:00:00+08:00' or a UTC datetime")
    return int(ts.tz_convert("UTC").value // 1_000_000)


class ReplayRowsBuilder:
    """Turns a raw log + videos into ``ReplayRows`` (dedup, author join, time filter, limit)."""

    def build(self, log: pd.DataFrame, videos: pd.DataFrame, start=None, end=None,
              limit: int | None = None) -> ReplayRows:
        """Rows of ``log`` to replay.

        Args:
            log: raw log (``pipelines.raw.LOG_DTYPES`` columns; needs user_id, video_id, time_ms,
                date, the label columns, play_time_ms, duration_ms, tab).
            videos: raw videos (``video_id``, ``author_id``).
            start, end: keep rows with ``start <= log time < end`` (timezone-aware datetime,
                ``pd.Timestamp`` or ISO string with offset); ``None`` = unbounded.
            limit: keep only the first ``limit`` rows (in time order) after filtering.

        Raises:
            ValueError: a required column is missing, a label is not 0/1, a naive start/end,
                ``start >= end`` or ``limit < 0``.
        """
        missing = [c for c in ("user_id", "video_id", "time_ms", *RAW_LABEL_COLUMNS) if c not in log.columns]
        if missing:
            raise ValueError(f"log is missing columns {missing}; expected the KuaiRand log schema ({list(LOG_DTYPES)})")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        start_ms, end_ms = _to_ms(start, "start"), _to_ms(end, "end")
        if start_ms is not None and end_ms is not None and start_ms >= end_ms:
            raise ValueError(f"start ({start}) must be before end ({end})")
        for raw in RAW_LABEL_COLUMNS:
            bad = ~log[raw].isin([0, 1])
            if bad.any():
                raise ValueError(f"label column {raw} must be 0/1; found {log.loc[bad, raw].unique()[:5].tolist()}")
        dedup, n_dup = deduplicate_log(log)
        imp, unknown = impressions_table(dedup, videos)
        t = (imp["event_ts"].astype("int64") // 1000).to_numpy()  # us -> ms (tables are us precision)
        keep = np.ones(len(imp), dtype=bool)
        if start_ms is not None:
            keep &= t >= start_ms
        if end_ms is not None:
            keep &= t < end_ms
        idx = np.flatnonzero(keep)
        if limit is not None:
            idx = idx[:limit]
        return ReplayRows(
            user_id=imp["user_id"].to_numpy()[idx], post_id=imp["post_id"].to_numpy()[idx],
            author_id=imp["author_id"].to_numpy()[idx], time_ms=t[idx],
            labels={h: imp[h].to_numpy()[idx] for h in _HEADS},
            dropped_duplicates=n_dup, unknown_video_rows=len(unknown),
        )


class ReplayEventBuilder:
    """The events of one replay row, in publish order: impression, engagements, follow edge."""

    def events(self, rows: ReplayRows, i: int, event_ts: datetime | None = None) -> list[AnyEvent]:
        """Events of row ``i``, stamped ``event_ts`` (timezone-aware; default the row's log time,
        UTC). A follow of oneself (user_id == author_id) yields the engagement event but no
        ``SocialGraphEvent``."""
        u, p, a, ms = int(rows.user_id[i]), int(rows.post_id[i]), int(rows.author_id[i]), int(rows.time_ms[i])
        ts = event_ts or pd.Timestamp(ms, unit="ms", tz="UTC").to_pydatetime()
        out: list[AnyEvent] = [EngagementEvent(event_id=event_id(u, p, ms, "impression"), event_ts=ts,
                                               kind="impression", user_id=u, post_id=p, author_id=a)]
        for head in _HEADS:
            if rows.labels[head][i] == 1:
                out.append(EngagementEvent(event_id=event_id(u, p, ms, head), event_ts=ts, kind=head,
                                           user_id=u, post_id=p, author_id=a))
        if rows.labels["follow"][i] == 1 and u != a:
            out.append(SocialGraphEvent(event_id=event_id(u, p, ms, FOLLOW_ID_SUFFIX), event_ts=ts,
                                        action="follow", user_id=u, author_id=a))
        return out


class ReplayPacer:
    """Schedules row batches on a monotonic clock relative to the start (no drift).

    Args:
        speed: log seconds per wall second (> 0), or ``0``/``None`` for no pacing.
        tick_s: rows due within this many wall seconds of a batch's first row join that batch.
        clock, sleep: ``time.monotonic`` / ``time.sleep`` (injectable for a unit test).

    Raises:
        ValueError: ``speed < 0`` or ``tick_s <= 0``.
    """

    def __init__(self, speed: float | None, tick_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if speed is not None and speed < 0:
            raise ValueError(f"speed must be >= 0 (log seconds per wall second; 0 = as fast as possible), got {speed}")
        if tick_s <= 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s}")
        self.speed = float(speed or 0.0)
        self.tick_s = tick_s
        self.clock = clock
        self.sleep = sleep

    def batches(self, time_ms: np.ndarray, max_batch: int = 1000) -> Iterator[slice]:
        """Yield consecutive row slices of the time-ordered ``time_ms`` (epoch ms), each after
        sleeping until its first row is due. Unpaced: slices of ``max_batch`` rows, no sleeping."""
        n = len(time_ms)
        if n == 0:
            return
        if self.speed == 0:
            for s in range(0, n, max_batch):
                yield slice(s, min(s + max_batch, n))
            return
        t0 = int(time_ms[0])
        due = (time_ms.astype("float64") - t0) / 1000.0 / self.speed  # wall seconds after start
        start = self.clock()
        i = 0
        while i < n:
            # Batch = rows due before this batch's first due time + tick (binary search, time-ordered).
            j = int(np.searchsorted(due, due[i] + self.tick_s, side="left"))
            j = max(j, i + 1)
            wait = start + due[i] - self.clock()
            if wait > 0:
                self.sleep(wait)
            yield slice(i, j)
            i = j


@dataclass
class ReplayStats:
    """Outcome of a replay.

    ``rows``: log rows replayed; ``events_published``: total events; ``events_by_kind``: per kind
    (``"impression"``, heads, ``"social_follow"``); ``wall_seconds``: monotonic duration;
    ``log_seconds``: last - first row log time; ``achieved_speed``: log_seconds / wall_seconds
    (``None`` when either is 0); ``dropped_duplicates`` / ``unknown_video_rows``: rows removed before
    replay; ``first_ts_ms`` / ``last_ts_ms``: epoch ms of the first / last row (``None`` if no rows).
    """

    rows: int = 0
    events_published: int = 0
    events_by_kind: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0
    log_seconds: float = 0.0
    achieved_speed: float | None = None
    dropped_duplicates: int = 0
    unknown_video_rows: int = 0
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def load_replay_inputs(log_path: Path | str | None = None, data_dir: Path | str | None = None
                       ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(log, videos) frames: ``log_path`` (default ``<data_dir>/`` ``pipelines.raw.LOG_FILE``) and
    ``<data_dir>/`` ``VIDEOS_FILE``; ``data_dir`` defaults to ``core.state.DEFAULT_DATA_DIR``.

    Raises:
        pipelines.raw.RawDataMissingError / RawDataParseError: as ``read_csv_typed``.
    """
    if data_dir is None:
        from core.state import DEFAULT_DATA_DIR
        data_dir = DEFAULT_DATA_DIR
    data_dir = Path(data_dir)
    log = read_csv_typed(Path(log_path) if log_path is not None else data_dir / LOG_FILE, LOG_DTYPES)
    return log, read_csv_typed(data_dir / VIDEOS_FILE, VIDEOS_DTYPES)


class LogReplayer:
    """Publishes the events of an impression log to ``bus`` paced at ``speed``.

    Args:
        bus: any ``EventBus`` (e.g. ``RedisStreamsBus``).
        topic: topic of the engagement events.
        speed: log seconds per wall second; ``0``/``None`` = as fast as possible.
        social_topic: topic of the follow ``SocialGraphEvent``s (default: ``topic``, so a consumer
            sees one time-ordered stream).
        tick_s: pacing granularity in wall seconds (see ``ReplayPacer``).
        time_mode: ``"live"`` stamps events with ``wall_clock()`` at publish, ``"log"`` with the log
            time (module docstring).
        wall_clock: epoch seconds for live stamps (injectable for tests).

    Raises:
        ValueError: bad speed / tick_s (from ``ReplayPacer``) or an unknown ``time_mode``.
    """

    def __init__(self, bus: EventBus, topic: str = "engagements", speed: float | None = 60.0,
                 social_topic: str | None = None, tick_s: float = 0.05,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 time_mode: str = "live", wall_clock: Callable[[], float] = time.time):
        if time_mode not in ("live", "log"):
            raise ValueError(f"time_mode must be 'live' (stamp at publish) or 'log' (keep log times), got {time_mode!r}")
        self.time_mode = time_mode
        self.wall_clock = wall_clock
        self.bus = bus
        self.topic = topic
        self.social_topic = social_topic or topic
        self.pacer = ReplayPacer(speed, tick_s=tick_s, clock=clock, sleep=sleep)
        self.clock = clock
        self.rows_builder = ReplayRowsBuilder()
        self.event_builder = ReplayEventBuilder()

    def replay(self, log: pd.DataFrame | None = None, videos: pd.DataFrame | None = None, *,
               log_path: Path | str | None = None, data_dir: Path | str | None = None,
               start=None, end=None, limit: int | None = None,
               on_total: Callable[[int], None] | None = None,
               on_rows: Callable[[int], None] | None = None,
               stop: threading.Event | None = None) -> ReplayStats:
        """Replay ``log`` (or, if ``None``, the file ``log_path`` / the shared log) and return stats.

        Args:
            log, videos: raw frames (``pipelines.raw`` dtypes); both or neither.
            log_path, data_dir: files read by ``load_replay_inputs`` when frames are not given.
            start, end, limit: as ``ReplayRowsBuilder.build`` (start inclusive, end exclusive).
            on_total: called once with the number of rows to replay, before publishing.
            on_rows: called with the number of rows of each published batch (progress bars).
            stop: when set, the replay ends after the current batch (the stats count what was published).

        Raises:
            ValueError: only one of ``log`` / ``videos`` given, or bad filters (see the builder).
        """
        if (log is None) != (videos is None):
            raise ValueError("pass both log and videos frames, or neither (then log_path/data_dir are read)")
        if log is None:
            log, videos = load_replay_inputs(log_path, data_dir)
        rows = self.rows_builder.build(log, videos, start=start, end=end, limit=limit)
        stats = ReplayStats(dropped_duplicates=rows.dropped_duplicates, unknown_video_rows=rows.unknown_video_rows)
        if on_total is not None:
            on_total(len(rows))
        t_start = self.clock()
        for batch in self.pacer.batches(rows.time_ms):
            if stop is not None and stop.is_set():
                break
            out: list[tuple[str, AnyEvent]] = []
            for i in range(batch.start, batch.stop):
                # a live stamp is taken as the row's events are built, before the batch's single
                # publish: the lag a processor measures includes that build time (it errs high)
                stamp = (datetime.fromtimestamp(self.wall_clock(), tz=timezone.utc)
                         if self.time_mode == "live" else None)
                for ev in self.event_builder.events(rows, i, stamp):
                    kind = ev.kind if isinstance(ev, EngagementEvent) else FOLLOW_ID_SUFFIX
                    out.append((self.topic if kind != FOLLOW_ID_SUFFIX else self.social_topic, ev))
                    stats.events_by_kind[kind] = stats.events_by_kind.get(kind, 0) + 1
            self.bus.publish_many(out)  # one round trip per batch, in order
            stats.events_published += len(out)
            if stats.first_ts_ms is None:
                stats.first_ts_ms = int(rows.time_ms[batch.start])
            stats.last_ts_ms = int(rows.time_ms[batch.stop - 1])
            stats.rows += batch.stop - batch.start
            if on_rows is not None:
                on_rows(batch.stop - batch.start)
        if stats.rows:
            stats.log_seconds = (stats.last_ts_ms - stats.first_ts_ms) / 1000.0
        stats.wall_seconds = self.clock() - t_start
        if stats.wall_seconds > 0 and stats.log_seconds > 0:
            stats.achieved_speed = stats.log_seconds / stats.wall_seconds
        return stats


def main(argv: list[str] | None = None) -> int:
    """CLI: replay a log into Redis Streams; prints the stats as JSON. Returns the exit code."""
    import redis
    from tqdm import tqdm

    from pipelines.streaming.bus import RedisStreamsBus

    ap = argparse.ArgumentParser(prog="python -m pipelines.streaming.replay", description=__doc__.split("\n")[0])
    ap.add_argument("--log", default=None, help=f"impression log CSV (default: <data-dir>/{LOG_FILE})")
    ap.add_argument("--data-dir", default=None, help="folder with the videos CSV (default: the shared data)")
    ap.add_argument("--speed", type=float, default=60.0, help="log seconds per wall second; 0 = as fast as possible")
    ap.add_argument("--redis-url", default=os.environ.get("HOME_MIXER_REDIS_URL", "redis://127.0.0.1:6379/0"))
    ap.add_argument("--topic", default="engagements")
    ap.add_argument("--time", dest="time_mode", choices=("live", "log"), default="live",
                    help="event time: live = wall clock at publish (default), log = the log's own time")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N rows")
    ap.add_argument("--start", default=None, help="ISO time with offset, inclusive")
    ap.add_argument("--end", default=None, help="ISO time with offset, exclusive")
    args = ap.parse_args(argv)
    client = connect(args.redis_url)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        print(f"cannot reach Redis at {args.redis_url} ({exc}); start it or pass --redis-url", file=sys.stderr)
        return 2
    try:
        replayer = LogReplayer(RedisStreamsBus(client), topic=args.topic, speed=args.speed,
                               time_mode=args.time_mode)
        log, videos = load_replay_inputs(args.log, args.data_dir)
        with tqdm(unit="row", desc="replay") as bar:
            def set_total(n: int) -> None:  # known only after dedup / filters
                bar.total = n
                bar.refresh()
            stats = replayer.replay(log, videos, start=args.start, end=args.end, limit=args.limit,
                                    on_total=set_total, on_rows=bar.update)
    except (ValueError, FileNotFoundError) as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return 2
    finally:
        client.close()
    print(json.dumps(stats.to_dict()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
