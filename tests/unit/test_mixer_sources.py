"""ParallelSourceRunner: parallel calls, per-source timeout, fail-open."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from mixer.candidate import Candidate, Query
from mixer.candidate_sources import CandidateSource, ParallelSourceRunner


class SleepySource(CandidateSource):
    def __init__(self, name, n, sleep_s=0.0, timeout_ms=200.0, fail=False, on=True):
        self.name, self.n, self.sleep_s, self.timeout_ms, self.fail = name, n, sleep_s, timeout_ms, fail
        self.on, self.calls = on, 0
        self.release = threading.Event()

    def enabled(self, query):
        return self.on

    def fetch(self, query):
        self.calls += 1
        if self.sleep_s:
            self.release.wait(self.sleep_s)
        if self.fail:
            raise ConnectionError("index shard down")
        return [Candidate(post_id=i, source=self.name) for i in range(self.n)]


@pytest.fixture()
def pool():
    ex = ThreadPoolExecutor(max_workers=4)
    yield ex
    ex.shutdown(wait=False, cancel_futures=True)


def test_slow_and_failing_sources_are_skipped_fail_open(pool):
    slow = SleepySource("slow", 5, sleep_s=5.0, timeout_ms=50)
    runner = ParallelSourceRunner([SleepySource("a", 3), slow, SleepySource("bad", 2, fail=True),
                                   SleepySource("b", 4, sleep_s=0.02)], pool)
    t0 = time.perf_counter()
    cands, results = runner.run(Query(1, 10, 0.0, "r"))
    elapsed = time.perf_counter() - t0
    slow.release.set()
    assert elapsed < 1.0  # did not wait the slow source's 5 s
    status = {r.name: r.status for r in results}
    assert status == {"a": "ok", "slow": "timeout", "bad": "error", "b": "ok"}
    assert "index shard down" in next(r.error for r in results if r.name == "bad")
    assert [c.source for c in cands] == ["a"] * 3 + ["b"] * 4  # source order kept


def test_sources_run_in_parallel(pool):
    sources = [SleepySource(f"s{i}", 1, sleep_s=0.2, timeout_ms=1000) for i in range(3)]
    t0 = time.perf_counter()
    _, results = ParallelSourceRunner(sources, pool).run(Query(1, 10, 0.0, "r"))
    assert all(r.status == "ok" for r in results)
    assert time.perf_counter() - t0 < 0.45  # 3 x 0.2 s sequentially would be 0.6 s


def test_duplicate_source_names_rejected(pool):
    with pytest.raises(ValueError, match="unique"):
        ParallelSourceRunner([SleepySource("a", 1), SleepySource("a", 1)], pool)


def test_disabled_sources_are_not_called_and_not_reported(pool):
    off = SleepySource("off", 5, on=False)
    cands, results = ParallelSourceRunner([SleepySource("a", 2), off], pool).run(Query(1, 10, 0.0, "r"))
    assert [r.name for r in results] == ["a"] and len(cands) == 2 and off.calls == 0
