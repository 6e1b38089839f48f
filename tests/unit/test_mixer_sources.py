"""ParallelSourceRunner: parallel calls, per-source timeout, fail-open."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from mixer.candidate import Candidate, Query
from mixer.candidate_sources import CandidateSource, ParallelSourceRunner


class SleepySource(CandidateSource):
    def __init__(self, name, n, sleep_s=0.0, timeout_ms=200.0, fail=False, on=True, barrier=None):
        self.name, self.n, self.sleep_s, self.timeout_ms, self.fail = name, n, sleep_s, timeout_ms, fail
        self.on, self.calls, self.barrier = on, 0, barrier
        self.release = threading.Event()
        self.finished = threading.Event()

    def enabled(self, query):
        return self.on

    def fetch(self, query):
        self.calls += 1
        try:
            if self.barrier is not None:
                self.barrier.wait()  # breaks (raises) unless every source is inside fetch at once
            if self.sleep_s:
                self.release.wait(self.sleep_s)
            if self.fail:
                raise ConnectionError("index shard down")
            return [Candidate(post_id=i, source=self.name) for i in range(self.n)]
        finally:
            self.finished.set()


@pytest.fixture()
def pool():
    ex = ThreadPoolExecutor(max_workers=4)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


def test_slow_and_failing_sources_are_skipped_fail_open(pool):
    slow = SleepySource("slow", 5, sleep_s=5.0, timeout_ms=50)
    runner = ParallelSourceRunner([SleepySource("a", 3), slow, SleepySource("bad", 2, fail=True),
                                   SleepySource("b", 4, sleep_s=0.02)], pool)
    cands, results = runner.run(Query(1, 10, 0.0, "r"))
    assert not slow.finished.is_set()  # answered while the slow source still sleeps its 5 s
    slow.release.set()
    status = {r.name: r.status for r in results}
    assert status == {"a": "ok", "slow": "timeout", "bad": "error", "b": "ok"}
    assert "index shard down" in next(r.error for r in results if r.name == "bad")
    assert [c.source for c in cands] == ["a"] * 3 + ["b"] * 4  # source order kept


def test_sources_run_in_parallel(pool):
    # run one after another, the first would wait at the barrier alone until it breaks (error)
    barrier = threading.Barrier(3, timeout=5.0)
    sources = [SleepySource(f"s{i}", 1, timeout_ms=10_000, barrier=barrier) for i in range(3)]
    _, results = ParallelSourceRunner(sources, pool).run(Query(1, 10, 0.0, "r"))
    assert [r.status for r in results] == ["ok"] * 3 and not barrier.broken


def test_duplicate_source_names_rejected(pool):
    with pytest.raises(ValueError, match="unique"):
        ParallelSourceRunner([SleepySource("a", 1), SleepySource("a", 1)], pool)


def test_disabled_sources_are_not_called_and_not_reported(pool):
    off = SleepySource("off", 5, on=False)
    cands, results = ParallelSourceRunner([SleepySource("a", 2), off], pool).run(Query(1, 10, 0.0, "r"))
    assert [r.name for r in results] == ["a"] and len(cands) == 2 and off.calls == 0
