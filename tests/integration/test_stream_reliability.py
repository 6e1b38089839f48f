"""Reliability of the real-time path against real processes (issue 4, item 7).

1. A stream processor SIGKILLed in the middle of a replay, with entries delivered to it but not
   acknowledged, is replaced by another one that reclaims them: no event lost, none counted twice.
2. A redis-server SIGKILLed mid-stream and restarted on its AOF keeps every acknowledged event; the
   producer re-publishes what failed, the processor retries, and the end state is exact.
3. Malformed entries reach the dead-letter stream with their reason and payload while a running
   processor applies the valid events around them.

Each test has its own redis-server (own state folder, so killing it disturbs no other test), replays
a real slice of the KuaiRand log with the real ``LogReplayer`` (log time, paced so a kill lands
mid-stream), runs the processor as a separate OS process and compares the online state with a
recomputation straight from the events (``_stream_recompute``).
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from core import online_layout as keys
from core.online_store import connect
from core.realtime import seen_hour
from core.services import RedisServer
from core.state import StateDir
from pipelines.raw import LOG_DTYPES, LOG_FILE, VIDEOS_DTYPES, VIDEOS_FILE, read_csv_typed
from pipelines.streaming.bus import RedisStreamsBus
from pipelines.streaming.events import EngagementEvent, encode_event, parse_event
from pipelines.streaming.processor import StreamProcessor
from pipelines.streaming.replay import LogReplayer, ReplayEventBuilder, ReplayRowsBuilder
from tests.integration._stream_recompute import (
    entity_ids, expected_state, observed_state, seen_event_ids, state_diff,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TOPIC, GROUP = "engagements", "feature-writer"  # the processor's defaults
KEY = keys.event_stream(TOPIC)
N_ROWS = 3_000            # first rows of the log file: 2,944 after dedup, ~5.2k events over 10 h of log time
REPLAY_WALL_S = 4.0       # the replay is paced to last about this long, so kills land mid-stream
RECLAIM_IDLE_MS = 500     # entries pending this long belong to a dead consumer (short, for the test)
OUTAGE_S = 0.5            # redis stays down this long: the producer (a batch every 50 ms) must hit it


# ---------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def replay_slice(data_dir):
    """``(log, videos, rows, events)``: the raw slice, its ``ReplayRows`` and every event a log-time
    replay publishes, in publish order (built by the replay's own row / event builders)."""
    log = pd.read_csv(data_dir / LOG_FILE, nrows=N_ROWS, dtype=LOG_DTYPES)
    videos = read_csv_typed(data_dir / VIDEOS_FILE, VIDEOS_DTYPES)
    rows = ReplayRowsBuilder().build(log, videos)
    builder = ReplayEventBuilder()
    events = [e for i in range(len(rows)) for e in builder.events(rows, i)]
    assert len({e.event_id for e in events}) == len(events)
    return log, videos, rows, events


@pytest.fixture()
def own_redis(tmp_path):
    """A redis-server of this test alone (AOF, appendfsync everysec) in its own state folder."""
    srv = RedisServer(StateDir(tmp_path / "state").ensure()).start()
    yield srv
    srv.stop()


@pytest.fixture()
def processes():
    """The child processes a test starts; any still running at the end are killed (by pid)."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()  # also ends a SIGSTOPped one
            p.wait(timeout=10)


def _spawn(processes: list, argv: list[str], log_path: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)  # set by `import feast` in this session; not the child's
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    processes.append(proc)
    return proc


def _cli_processor(processes: list, state: StateDir, consumer: str, tmp_path: Path) -> subprocess.Popen:
    """`home-mixer --state <state> stream run --consumer <consumer> --reclaim-idle-ms 500`."""
    return _spawn(processes, [sys.executable, "-m", "home_mixer.cli", "--state", str(state.root), "stream", "run",
                              "--consumer", consumer, "--reclaim-idle-ms", str(RECLAIM_IDLE_MS)],
                  tmp_path / f"{consumer}.log")


def _stop(proc: subprocess.Popen, log_path: Path) -> dict[str, int]:
    """SIGTERM a processor and return its outcome counts (the dict on its last output line)."""
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=20)
    out = log_path.read_text()
    assert rc == 0, out
    last = out.strip().splitlines()[-1]
    return ast.literal_eval(last[last.index("{"):])


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def _group(client: redis.Redis, groups=None) -> dict:
    for g in groups if groups is not None else client.xinfo_groups(KEY):
        if g["name"].decode() == GROUP:
            return g
    raise AssertionError(f"no group {GROUP} on {KEY}")


def _group_exists(client: redis.Redis) -> bool:
    """The processor creates the group on its first read (a consumer shows in XINFO CONSUMERS only
    once Redis 7.0 delivered something to it, so the group is the readiness signal)."""
    try:
        return any(g["name"].decode() == GROUP for g in client.xinfo_groups(KEY))
    except redis.ResponseError:  # no stream yet
        return False


def _acked(client: redis.Redis) -> int:
    """Entries the group has read and acknowledged (XINFO GROUPS entries-read - pending)."""
    try:
        g = _group(client)
    except (redis.ResponseError, AssertionError):
        return 0
    return int(g["entries-read"] or 0) - int(g["pending"])


def _drained(client: redis.Redis) -> bool:
    g = _group(client)
    return g["lag"] == 0 and g["pending"] == 0


def _id_key(entry_id: bytes | str) -> tuple[int, int]:
    ms, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")
    return int(ms), int(seq)


def _pending_now(client: redis.Redis) -> tuple[list[dict], list, set[str]]:
    """``(XPENDING rows, their events, ids of those events already written)`` of the group."""
    rows = client.xpending_range(KEY, GROUP, min="-", max="+", count=1_000_000)
    if not rows:
        return [], [], set()
    pipe = client.pipeline(transaction=False)
    for r in rows:
        pipe.xrange(KEY, r["message_id"], r["message_id"])
    events = [parse_event(entry[0][1]) for entry in pipe.execute()]
    for e in events:  # the marker each kind of event writes (single-Redis layout)
        if isinstance(e, EngagementEvent):
            pipe.sismember(keys.rt_seen_set(seen_hour(e.event_ts.timestamp())), e.event_id)
        else:
            pipe.exists(keys.rt_user_seen_event(e.user_id, e.event_id))
    written = {e.event_id for e, n in zip(events, pipe.execute()) if n}
    return rows, events, written


def _freeze_with_entries_pending(proc: subprocess.Popen, client: redis.Redis, prefer_written: bool,
                                 attempts: int = 45) -> tuple[list[dict], list, set[str], int]:
    """SIGSTOP the processor ``proc`` at a moment when entries delivered to it are unacknowledged.

    A frozen process acknowledges nothing, so what XPENDING shows while it is frozen is exactly what
    a kill leaves pending. Redis still serves a read the process was blocked in when it froze (the
    entries become pending, never seen by the process), so with a live producer most freezes
    qualify; a freeze between an XACK and the next read does not: thaw and try again. With
    ``prefer_written`` the first two thirds of the attempts also wait for a freeze that caught a
    batch written but not yet acknowledged (the redelivery idempotency exists for).

    Returns ``(pending rows, pending events, ids written, attempts used)``.
    """
    for attempt in range(1, attempts + 1):
        os.kill(proc.pid, signal.SIGSTOP)
        time.sleep(0.06)  # > the producer's 50 ms tick: a blocked read is served meanwhile
        rows, events, written = _pending_now(client)
        if rows and (written or not prefer_written or attempt > attempts * 2 // 3):
            return rows, events, written, attempt
        os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005 * (attempt % 7))  # vary the phase against the processor's loop
    raise AssertionError(f"no freeze in {attempts} attempts found entries pending; is the producer running?")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:  # already reaped by subprocess' own cleanup
        pass


class ResumingProducer(threading.Thread):
    """Replays the slice with the real ``LogReplayer`` (log time, paced to ``REPLAY_WALL_S``) from a
    thread with its own client.

    The client does not retry by itself, so a publish during a Redis outage raises; the producer
    then replays again from the first row it does not know to be published (``replay(start=...)``
    at that row's log time), re-publishing the rest of its millisecond and maybe a prefix of the
    failed batch: safe, since event ids are deterministic and the processor's writes idempotent.
    ``failures`` counts the failed attempts; ``error`` holds anything else that went wrong.
    """

    def __init__(self, url: str, log: pd.DataFrame, videos: pd.DataFrame, time_ms: np.ndarray):
        super().__init__(daemon=True)
        self.url, self.log, self.videos, self.time_ms = url, log, videos, time_ms
        self.speed = (int(time_ms[-1]) - int(time_ms[0])) / 1000.0 / REPLAY_WALL_S
        self.failures = 0
        self.done = False
        self.error: BaseException | None = None

    def run(self) -> None:
        client = connect(self.url, retry=Retry(NoBackoff(), 0))  # a redis:// or redis+sentinel:// address
        replayer = LogReplayer(RedisStreamsBus(client), topic=TOPIC, speed=self.speed, time_mode="log")
        published = 0  # length of the prefix of rows known to be published
        deadline = time.monotonic() + 60
        try:
            while published < len(self.time_ms):
                t = int(self.time_ms[published])
                first = int(np.searchsorted(self.time_ms, t, side="left"))  # the replay restarts here
                progress = [0]
                try:
                    replayer.replay(self.log, self.videos,
                                    start=None if published == 0 else pd.Timestamp(t, unit="ms", tz="UTC"),
                                    on_rows=lambda n: progress.__setitem__(0, progress[0] + n))
                    published = len(self.time_ms)
                except redis.RedisError:
                    self.failures += 1
                    published = first + progress[0]
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.done = True
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            client.close()


def _assert_final_state(client: redis.Redis, events: list) -> None:
    """Every event applied exactly once: seen markers == the event ids and the online state equals
    the recomputation from the events, evaluated 1 s after the last one."""
    assert seen_event_ids(client) == {e.event_id for e in events}
    now = max(e.event_ts.timestamp() for e in events) + 1.0
    ids = entity_ids(events)
    assert state_diff(observed_state(client, now, ids), expected_state(events, now, ids)) == []


# ---------------------------------------------------------------- 1. processor crash
def test_processor_sigkilled_mid_replay_is_replaced_without_loss_or_double_count(
        own_redis, replay_slice, processes, tmp_path):
    log, videos, rows, events = replay_slice
    client = redis.Redis.from_url(own_redis.url)
    a = _cli_processor(processes, own_redis.state, "A", tmp_path)
    _wait_for(lambda: _group_exists(client), 30, "processor A to create its group")
    producer = ResumingProducer(own_redis.url, log, videos, rows.time_ms)
    producer.start()
    _wait_for(lambda: _acked(client) >= len(events) // 4, 30, "a quarter of the events to be applied")

    pending, pending_events, written, attempts = _freeze_with_entries_pending(a, client, prefer_written=True)
    os.kill(a.pid, signal.SIGKILL)  # a crash: no cleanup, no ack of the batch in hand
    a.wait(timeout=10)
    applied_at_kill = seen_event_ids(client)
    published_at_kill = client.xlen(KEY)
    assert {r["consumer"] for r in pending} == {b"A"}
    assert client.xpending(KEY, GROUP)["pending"] == len(pending)  # nothing changed at the kill
    assert 0 < len(applied_at_kill) < len(events) and published_at_kill < len(events), "kill not mid-replay"
    # A batch's writes are atomic and in stream order (one script per run of engagements, in one
    # pipeline), so what the killed process wrote of its entries in hand is a prefix of them: a
    # whole batch (or a prefix of its pipeline), never a scattered subset.
    marked = [e.event_id in written for e in pending_events]
    assert marked == sorted(marked, reverse=True), marked
    # ...and a run of engagements acknowledges its entries in its own script (the bus is this
    # Redis): none can be written and still pending; only a social event's separate XACK can lag.
    assert not {e.event_id for e in pending_events if isinstance(e, EngagementEvent)} & written
    print(f"\nkill after {attempts} freeze(s): {len(applied_at_kill)}/{len(events)} events applied, "
          f"{published_at_kill} published, {len(pending)} pending of which {len(written)} written, not acked")

    # B reclaims A's entries on its first read, if they have been idle RECLAIM_IDLE_MS by then.
    time.sleep(RECLAIM_IDLE_MS / 1000 + 0.1)
    t0 = time.monotonic()
    b = _cli_processor(processes, own_redis.state, "B", tmp_path)
    producer.join(timeout=60)
    assert producer.done and producer.error is None and producer.failures == 0, producer.error
    _wait_for(lambda: _drained(client), 60, "the group to have no lag and nothing pending")
    stats = _stop(b, tmp_path / "B.log")
    print(f"B (started {RECLAIM_IDLE_MS + 100} ms after the kill) drained in {time.monotonic() - t0:.1f} s: {stats}")

    # The stream holds every event exactly once, in order (the producer did not re-publish)...
    assert [parse_event(f) for _, f in client.xrange(KEY)] == events
    # ...A's pending entries went to B: the written ones were no-ops, the rest applied once.
    consumers = {c["name"].decode(): c for c in client.xinfo_consumers(KEY, GROUP)}
    assert consumers["A"]["pending"] == 0
    assert stats.get("duplicate", 0) == len(written)
    assert stats.get("applied", 0) + stats.get("stale", 0) == len(events) - len(applied_at_kill)
    assert not stats.get("failed") and client.xlen(keys.dead_letter_stream(TOPIC)) == 0
    _assert_final_state(client, events)


# ---------------------------------------------------------------- 2. redis crash
def test_redis_sigkilled_mid_stream_keeps_every_acknowledged_event(own_redis, replay_slice, processes, tmp_path):
    log, videos, rows, events = replay_slice
    client = redis.Redis.from_url(own_redis.url)  # redis-py reconnects (and retries) after the restart
    # the real CLI, with its default 30 s reclaim period: its own stranded batch must come back sooner
    p = _cli_processor(processes, own_redis.state, "P", tmp_path)
    _wait_for(lambda: _group_exists(client), 30, "processor P to create its group")
    producer = ResumingProducer(own_redis.url, log, videos, rows.time_ms)
    producer.start()
    _wait_for(lambda: _acked(client) >= len(events) // 4, 30, "a quarter of the events to be applied")

    # P is the only process that acknowledges: frozen, the acknowledged set is fixed until the kill.
    _freeze_with_entries_pending(p, client, prefer_written=False)
    # Wait for the AOF buffer to be empty once, i.e. every write P made has reached the kernel.
    # (With appendfsync everysec Redis write(2)s the buffer before it replies, except while a slow
    # fsync postpones it, for up to 2 s; that would lose acknowledged writes, and is not what we test.)
    _wait_for(lambda: int(client.info("persistence")["aof_buffer_length"]) == 0, 5, "the AOF buffer to drain")
    pipe = client.pipeline(transaction=True)  # one consistent snapshot
    pipe.xinfo_groups(KEY)
    pipe.xpending_range(KEY, GROUP, min="-", max="+", count=1_000_000)
    pipe.xrange(KEY)
    groups, pending, entries = pipe.execute()
    last = _id_key(_group(client, groups)["last-delivered-id"])
    pending_ids = {r["message_id"] for r in pending}
    acked = [(i, parse_event(f)) for i, f in entries if _id_key(i) <= last and i not in pending_ids]
    written = seen_event_ids(client)
    assert pending and acked and {e.event_id for _, e in acked} <= written

    # SIGKILL: no shutdown, so no final AOF flush or fsync. What survives is what Redis had written to
    # the kernel; with appendfsync everysec only an OS crash or power loss can lose up to ~1 s of that
    # (redis.conf: "lose just one second of writes in a dramatic event like a server power outage, or a
    # single write if something wrong with the Redis process itself happens").
    os.kill(own_redis.pid, signal.SIGKILL)
    _reap(own_redis.pid)
    time.sleep(OUTAGE_S)
    own_redis.start()  # same port, same data dir: loads the AOF

    # Before P resumes: every entry the producer saw acknowledged, every ack and every write survived.
    survived = client.xrange(KEY)
    assert [i for i, _ in survived[:len(entries)]] == [i for i, _ in entries]
    pending_after = {r["message_id"] for r in client.xpending_range(KEY, GROUP, min="-", max="+", count=1_000_000)}
    assert _id_key(_group(client)["last-delivered-id"]) >= last
    assert not pending_after & {i for i, _ in acked} and pending_ids <= pending_after
    assert seen_event_ids(client) == written
    now = events[-1].event_ts.timestamp() + 1.0
    ids = entity_ids(events)
    applied = [e for e in events if e.event_id in written]  # exactly these, each fully (atomic scripts)
    assert state_diff(observed_state(client, now, ids), expected_state(applied, now, ids)) == []
    print(f"\nredis killed with {len(acked)} entries acked, {len(pending)} delivered but unacked, "
          f"{len(entries)} in the stream; {len(written)}/{len(events)} events written; all survived")

    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGCONT)
    producer.join(timeout=60)
    assert producer.done and producer.error is None, producer.error
    assert producer.failures >= 1  # the outage reached the producer, which re-published from where it stood
    # P's entries pending before the crash are not read again by XREADGROUP ">": after the error P
    # re-reads its own pending list (well before the 30 s reclaim would take them).
    _wait_for(lambda: _drained(client), 60, "the group to have no lag and nothing pending")
    drained_s = time.monotonic() - t0
    assert drained_s < 15, f"P took {drained_s:.1f} s to apply its own stranded entries"
    stats = _stop(p, tmp_path / "P.log")
    print(f"producer failed publishes {producer.failures}; stream {client.xlen(KEY)} entries for "
          f"{len(events)} events; drained {drained_s:.1f} s after P resumed; P: {stats}")
    published = [parse_event(f).event_id for _, f in client.xrange(KEY)]
    assert set(published) == {e.event_id for e in events} and len(published) >= len(events)
    assert not stats.get("failed") and client.xlen(keys.dead_letter_stream(TOPIC)) == 0
    _assert_final_state(client, events)


# ---------------------------------------------------------------- 3. malformed entries
def test_malformed_entries_are_dead_lettered_while_a_running_processor_applies_the_rest(
        own_redis, replay_slice, processes, tmp_path):
    *_, events = replay_slice
    valid = events[:40]
    client = redis.Redis.from_url(own_redis.url)
    bus = RedisStreamsBus(client)
    good = json.loads(encode_event(valid[0])[b"event"])

    def fields(d: dict) -> dict[bytes, bytes]:
        return {b"event": json.dumps(d).encode(), b"type": b"engagement"}

    malformed = [  # (raw entry fields, words its dead-letter reason must contain)
        ({b"event": b'{"type": "engagement", "event_id": "x"', b"type": b"engagement"}, ["not valid JSON"]),
        (fields({k: v for k, v in good.items() if k != "user_id"}), ["user_id", "required"]),
        (fields(good | {"post_id": "ten"}), ["post_id", "integer"]),
        (fields(good | {"event_ts": "2022-04-25T08:00:00"}), ["event_ts", "timezone"]),
        (fields(good | {"kind": "share"}), ["kind", "impression"]),
        (fields(good | {"type": "retweet"}), ["type", "retweet"]),
        ({b"payload": b"\xff\x00"}, ["no 'event' field"]),
    ]
    c = _cli_processor(processes, own_redis.state, "C", tmp_path)
    _wait_for(lambda: _group_exists(client), 30, "processor C to create its group")
    bad_ids = []
    for i, e in enumerate(valid):  # live: the processor reads while they arrive
        bus.publish(TOPIC, e)
        if i % 5 == 2 and len(bad_ids) < len(malformed):
            bad_ids.append(client.xadd(KEY, malformed[len(bad_ids)][0]).decode())
        time.sleep(0.005)
    assert len(bad_ids) == len(malformed)
    _wait_for(lambda: _drained(client), 30, "the group to have no lag and nothing pending")
    stats = _stop(c, tmp_path / "C.log")

    dead = bus.dead_letters(TOPIC)
    assert [d.original_id for d in dead] == bad_ids
    for d, (raw, words) in zip(dead, malformed):
        assert d.reason.startswith("invalid event: ") and all(w.lower() in d.reason.lower() for w in words), d.reason
        assert d.fields == raw and d.group == GROUP and d.original_topic == TOPIC
    assert stats.get("applied") == len(valid) and not stats.get("failed") and not stats.get("duplicate")
    g = _group(client)
    assert (g["pending"], g["lag"]) == (0, 0)
    _assert_final_state(client, valid)


# ---------------------------------------------------------------- 4. the pipelined drain
def test_a_pipelined_drain_of_a_backlog_writes_what_one_batch_at_a_time_writes(own_redis, replay_slice):
    """``run_once(pipelined=True)`` on a backlog overlaps the next batches' reads and Python work
    with the scripts of earlier ones; the effects must be those of one batch at a time: every event
    once (republished ones are duplicates), nothing left pending, the state equal to the recomputation."""
    _, _, _, events = replay_slice
    client = redis.Redis.from_url(own_redis.url)
    bus = RedisStreamsBus(client)
    again = events[::25]  # published twice (new entries, same event ids): a producer's retry
    bus.publish_many([(TOPIC, e) for e in events] + [(TOPIC, e) for e in again])
    proc = StreamProcessor(client, bus, consumer="P", backlog_every_s=0.2)
    calls = []
    while (n := proc.run_once(count=100, pipelined=True)) or not calls:
        calls.append(n)
    assert max(calls) > 300, calls  # one call went on past its first batch: the pipelined path ran
    assert proc.stats["applied"] == len(events) and proc.stats["duplicate"] == len(again)
    assert not proc.stats["failed"]
    assert client.xpending(KEY, GROUP)["pending"] == 0 and proc.refresh_backlog().lag == 0
    _assert_final_state(client, events)


def test_a_bad_key_mid_pipelined_drain_fails_its_events_alone_and_they_apply_once_it_is_mended(own_redis):
    """With two pipelines in flight, a batch whose script fails (one of its posts' counts key is a
    string) is retried one event per call after the batch sent behind it: the bad post's events stay
    pending, every other event is applied once, and once the key is mended a reclaim applies the
    rest; the state then equals the recomputation (the effects do not depend on that order)."""
    client, t0, events, _ = _thousand_clicks(own_redis, "k")
    bad = 10 + 5  # post of every 13th click
    client.set(keys.rt_post_counts(bad), "not a hash")
    proc = StreamProcessor(client, RedisStreamsBus(client), consumer="P", clock=lambda: t0 + 1001.0)
    while proc.run_once(count=100, pipelined=True):
        pass
    on_bad = [e for e in events if e.post_id == bad]
    assert proc.stats["failed"] == len(on_bad) and proc.stats["applied"] == len(events) - len(on_bad)
    assert client.xpending(KEY, GROUP)["pending"] == len(on_bad)
    assert seen_event_ids(client) == {e.event_id for e in events if e.post_id != bad}
    client.delete(keys.rt_post_counts(bad))
    mended = StreamProcessor(client, RedisStreamsBus(client), consumer="Q", reclaim_idle_ms=0,
                             clock=lambda: t0 + 1001.0)
    assert mended.reclaim(count=1000) == len(on_bad)
    assert client.xpending(KEY, GROUP)["pending"] == 0
    _assert_final_state(client, events)


class _TrimsOnRead(RedisStreamsBus):
    """A real ``RedisStreamsBus`` whose ``nth`` queued read first trims the stream's head up to the
    entry ``keep_from`` (``XTRIM MINID``), as a producer outrunning the length cap does: the
    entries not yet delivered before it are lost while batches read earlier are still in hand."""

    def __init__(self, client, nth: int, keep_from: bytes):
        super().__init__(client)
        self.nth, self.keep_from, self.reads = nth, keep_from, 0

    def queue_poll(self, pipe, *args, **kw):
        self.reads += 1
        if self.reads == self.nth:
            self.client.xtrim(KEY, minid=self.keep_from, approximate=False)
        return super().queue_poll(pipe, *args, **kw)


def _thousand_clicks(own_redis, prefix: str):
    """``(client, t0, events, entry ids)``: 1,000 clicks one second apart from ``t0``, published."""
    client = redis.Redis.from_url(own_redis.url)
    t0 = 1_651_406_400.0
    events = [EngagementEvent(event_id=f"{prefix}{i}", kind="click", user_id=1 + i % 7, post_id=10 + i % 13,
                              author_id=7, event_ts=pd.Timestamp(t0 + i, unit="s", tz="UTC").to_pydatetime())
              for i in range(1000)]
    return client, t0, events, RedisStreamsBus(client).publish_many([(TOPIC, e) for e in events])


def test_entries_lost_mid_pipelined_drain_restart_coverage_after_the_batches_before_the_gap(own_redis):
    from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader

    client, t0, events, ids = _thousand_clicks(own_redis, "g")
    # reads: 1 = run_once's poll (entries 0-99), 2-3 = the first pipeline's (100-299), 4 = the
    # second pipeline's: entries 300-499, never delivered, are trimmed just before it
    bus = _TrimsOnRead(client, nth=4, keep_from=ids[500].encode())
    proc = StreamProcessor(client, bus, consumer="P", clock=lambda: t0 + 1001.0)
    while proc.run_once(count=100, pipelined=True):
        pass
    assert bus.reads > 4 and proc.stats["lost"] == 200 and proc.stats["applied"] == 800
    # the reset ran after the writes of entries 200-299 (read before the gap) and before 500's:
    # coverage starts at the first event after the gap
    assert RealtimeFeatureReader(client).coverage().since == t0 + 500
    assert client.xpending(KEY, GROUP)["pending"] == 0


def test_a_failed_batch_before_a_gap_is_retried_before_the_gaps_coverage_reset(own_redis):
    """A batch before a gap whose script fails (a post's counts key is a string) is retried one
    event per call; the batch after the gap carries the coverage reset and must not run before that
    retry, or the retried events would pull coverage back over the hole."""
    from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader

    client, t0, events, ids = _thousand_clicks(own_redis, "r")
    client.set(keys.rt_post_counts(10 + 5), "not a hash")  # every batch holds clicks on post 15
    bus = _TrimsOnRead(client, nth=4, keep_from=ids[500].encode())  # 300-499 trimmed before read 4
    proc = StreamProcessor(client, bus, consumer="P", clock=lambda: t0 + 1001.0)
    while proc.run_once(count=100, pipelined=True):
        pass
    kept = [e for e in events[:300] + events[500:] if e.post_id != 15]
    assert proc.stats["lost"] == 200 and proc.stats["applied"] == len(kept)
    assert RealtimeFeatureReader(client).coverage().since == t0 + 500


class _FailsOnce(_TrimsOnRead):
    """``_TrimsOnRead`` that raises once, as a read-ahead reply with an error (a failover's
    READONLY, a BUSY script) would: at the 5th ``take_poll`` (``where="take"``: entries 600-699,
    while the pipeline with the gap's coverage reset and the writes of 500-599 is in flight) or at
    the 6th ``queue_poll`` (``where="queue"``: before that pipeline is sent). Either comes after
    the writes of the entries before the gap: the trim removed them from the stream, so had they
    still been pending they would be dead-lettered, not applied (Redis Streams' trimming)."""

    def __init__(self, client, nth: int, keep_from: bytes, where: str):
        super().__init__(client, nth, keep_from)
        self.where, self.takes = where, 0

    def queue_poll(self, pipe, *args, **kw):
        if self.where == "queue" and self.reads + 1 == 6:
            self.reads += 1
            raise redis.ResponseError("READONLY You can't write against a read only replica.")
        return super().queue_poll(pipe, *args, **kw)

    def take_poll(self, *args, **kw):
        self.takes += 1
        if self.where == "take" and self.takes == 5:
            raise redis.ResponseError("READONLY You can't write against a read only replica.")
        return super().take_poll(*args, **kw)


@pytest.mark.parametrize("where", ["take", "queue"])
def test_an_error_mid_pipelined_drain_leaks_no_connection_keeps_the_gap_and_loses_nothing(own_redis, where):
    from mixer.feature_hydrators.realtime_reader import RealtimeFeatureReader

    client, t0, events, ids = _thousand_clicks(own_redis, "f")
    # entries 300-499 trimmed before the 4th read; then an error (the class) before or while the
    # pipeline carrying the gap's coverage reset runs
    bus = _FailsOnce(client, nth=4, keep_from=ids[500].encode(), where=where)
    proc = StreamProcessor(client, bus, consumer="P", clock=lambda: t0 + 1001.0)
    with pytest.raises(redis.ResponseError, match="READONLY"):
        while proc.run_once(count=100, pipelined=True):
            pass
    assert not client.connection_pool._in_use_connections  # the pipeline in flight gave its connection back
    # what was in hand stays pending with P and is applied on P's restart (run()'s first step);
    # the gap's coverage reset, if its pipeline never ran, follows that first write
    proc._process(bus.consume_own_pending(TOPIC, GROUP, "P", 100))
    while proc.run_once(count=100, pipelined=True):
        pass
    # (the pipeline whose replies were dropped was applied in Redis but not counted here); coverage
    # starts after the gap
    assert proc.stats["lost"] == 200 and 700 <= proc.stats["applied"] <= 800 and not proc.stats["failed"]
    assert client.xpending(KEY, GROUP)["pending"] == 0
    assert RealtimeFeatureReader(client).coverage().since >= t0 + 500
    # each event once, none of the gap (coverage is not the recomputation's: it restarted after the gap)
    kept = events[:300] + events[500:]
    assert seen_event_ids(client) == {e.event_id for e in kept}
    now, ids = kept[-1].event_ts.timestamp() + 1.0, entity_ids(kept)
    assert [d for d in state_diff(observed_state(client, now, ids), expected_state(kept, now, ids))
            if not d.startswith("('coverage'")] == []
