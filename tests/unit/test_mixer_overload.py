"""Overload protection of the mixer: the in-flight bound (mixer.admission) and the latency quality
factor (mixer.quality_factor)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from mixer.admission import InFlightLimitMiddleware, OverloadSettings
from mixer.quality_factor import LinearLatencyQualityFactor, QualityFactorSettings, scaled


def _app(limit: int, release: asyncio.Event, rejected: list) -> FastAPI:
    app = FastAPI()
    app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=limit, retry_after_s=2),
                       paths=("/slow",), on_reject=lambda: rejected.append(1))

    @app.get("/slow")
    async def slow():
        await release.wait()
        return {"ok": True}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    return app


def test_requests_past_the_bound_are_refused_at_once_with_retry_after():
    async def scenario():
        release, rejected = asyncio.Event(), []
        app = _app(3, release, rejected)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = [asyncio.create_task(client.get("/slow")) for _ in range(3)]
            await asyncio.sleep(0.05)  # the three are admitted (one runs, two wait their turn)
            refused = await asyncio.wait_for(client.get("/slow"), timeout=1.0)  # answered without waiting
            health = await client.get("/healthz")  # other paths are not counted
            release.set()
            done = await asyncio.gather(*held)
            after = await client.get("/slow")  # the slots are free again
        return refused, health, done, after, rejected

    refused, health, done, after, rejected = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "2"
    assert "3 requests in flight" in refused.json()["message"]
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200, 200, 200]
    assert after.status_code == 200
    assert rejected == [1]


def test_a_zero_bound_disables_admission_control():
    async def scenario():
        release = asyncio.Event()
        release.set()
        app = _app(0, release, [])
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await asyncio.gather(*(client.get("/slow") for _ in range(20)))

    assert all(r.status_code == 200 for r in asyncio.run(scenario()))


def _qf(**kw) -> LinearLatencyQualityFactor:
    return LinearLatencyQualityFactor(QualityFactorSettings(target_p95_ms=50, step=0.2, min_factor=0.4,
                                                            window=20, update_every=10, **kw))


def test_quality_factor_steps_down_under_slow_requests_and_recovers():
    qf = _qf()
    factors = [qf.observe(120.0) for _ in range(40)]
    # one step per 10 requests: 0.8, 0.6, 0.4, then held at the floor
    assert factors[9] == pytest.approx(0.8) and factors[19] == pytest.approx(0.6)
    assert factors[29] == pytest.approx(0.4) and factors[39] == pytest.approx(0.4)
    assert factors[8] == 1.0  # nothing changes between updates
    # fast again: the window still holds slow requests for one update, then it climbs back step by step
    recovered = [qf.observe(10.0) for _ in range(60)]
    assert recovered[9] == pytest.approx(0.4)  # p95 of a half-slow window is still above target
    assert recovered[19] == pytest.approx(0.6)
    assert recovered[-1] == 1.0
    assert qf.p95_ms == pytest.approx(10.0)


def test_quality_factor_disabled_is_always_one():
    qf = _qf(enabled=False)
    assert {qf.observe(1000.0) for _ in range(50)} == {1.0}


@pytest.mark.parametrize("limit, factor, expected", [(200, 1.0, 200), (200, 0.4, 80), (3, 0.2, 1), (1000, 0.33, 330)])
def test_scaled_limits_round_up_and_never_reach_zero(limit, factor, expected):
    assert scaled(limit, factor) == expected


def test_sources_keep_their_best_share_under_a_quality_factor():
    from concurrent.futures import ThreadPoolExecutor

    from mixer.candidate import Candidate, Query
    from mixer.candidate_sources import CandidateSource, ParallelSourceRunner

    class Ranked(CandidateSource):
        name, timeout_ms, max_candidates = "ranked", 500.0, 10

        def enabled(self, query):
            return True

        def fetch(self, query):
            return [Candidate(post_id=i, source=self.name) for i in range(self.max_candidates)]

    with ThreadPoolExecutor(2) as pool:
        runner = ParallelSourceRunner([Ranked()], pool)
        full, _ = runner.run(Query(1, 10, 0.0, "r"))
        shed, results = runner.run(Query(1, 10, 0.0, "r", quality_factor=0.3))
    assert [c.post_id for c in full] == list(range(10))
    assert [c.post_id for c in shed] == [0, 1, 2]  # the first (best) 30 %
    assert len(results[0].candidates) == 3


def test_heavy_ranker_top_k_scales_with_the_quality_factor():
    import pandas as pd

    from mixer.candidate import Candidate, Query
    from mixer.selectors import TopKSelector

    cands = [Candidate(post_id=i, source="s", light_score=float(i)) for i in range(20)]
    frame = pd.DataFrame({"x": range(20)})
    full = TopKSelector(10).select(Query(1, 10, 0.0, "r"), cands, frame)
    half = TopKSelector(10).select(Query(1, 10, 0.0, "r", quality_factor=0.5), cands, frame)
    assert [c.post_id for c in full.candidates] == list(range(19, 9, -1))
    assert [c.post_id for c in half.candidates] == [19, 18, 17, 16, 15]


def test_requests_without_a_valid_token_take_no_slot():
    """Unauthenticated requests pass uncounted (the route refuses them), so they cannot fill the bound."""
    async def scenario():
        release = asyncio.Event()
        app = FastAPI()
        app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=1), paths=("/slow",),
                           admit=lambda scope: dict(scope["headers"]).get(b"authorization") == b"Bearer good")

        @app.get("/slow")
        async def slow():
            await release.wait()
            return {"ok": True}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            squatters = [asyncio.create_task(client.get("/slow", headers={"authorization": "Bearer bad"}))
                         for _ in range(5)]
            await asyncio.sleep(0.05)
            caller = asyncio.create_task(client.get("/slow", headers={"authorization": "Bearer good"}))
            await asyncio.sleep(0.05)
            second = await asyncio.wait_for(client.get("/slow", headers={"authorization": "Bearer good"}), 1.0)
            release.set()
            return await caller, second, await asyncio.gather(*squatters)

    caller, second, squatters = asyncio.run(scenario())
    assert caller.status_code == 200  # admitted although 5 unauthenticated requests were in flight
    assert second.status_code == 503  # the one slot was the caller's
    assert all(r.status_code == 200 for r in squatters)  # this stub route does not check tokens


def test_admitted_requests_run_one_at_a_time_in_arrival_order_and_their_wait_is_timed():
    """max_concurrent=1: the second and third admitted requests wait (FIFO) until the one ahead is
    answered; on_complete sees each latency from arrival, queue wait included."""
    async def scenario():
        gates = {i: asyncio.Event() for i in range(3)}
        order, latencies = [], []
        app = FastAPI()
        app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=3, max_concurrent=1),
                           paths=("/work",), on_complete=latencies.append)

        @app.get("/work")
        async def work(i: int):
            order.append(i)
            await gates[i].wait()
            return {"i": i}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            tasks = []
            for i in range(3):
                tasks.append(asyncio.create_task(client.get("/work", params={"i": i})))
                await asyncio.sleep(0.02)
            started_while_first_held = list(order)
            refused = await asyncio.wait_for(client.get("/work", params={"i": 9}), 1.0)  # 3 in flight: full
            await asyncio.sleep(0.1)
            gates[0].set()
            await tasks[0]
            await asyncio.sleep(0.02)
            started_after_first = list(order)
            gates[1].set()
            gates[2].set()
            done = await asyncio.gather(*tasks)
        return started_while_first_held, started_after_first, order, refused, done, latencies

    held, after_first, order, refused, done, latencies = asyncio.run(scenario())
    assert held == [0]  # the 2nd and 3rd were admitted but queued behind the 1st
    assert after_first == [0, 1]
    assert order == [0, 1, 2]
    assert refused.status_code == 503
    assert [r.json()["i"] for r in done] == [0, 1, 2]
    assert len(latencies) == 3  # the refusal is not a completed request
    assert min(latencies) >= 100.0  # each waited at least the 0.1 s the first was held


def test_two_execution_slots_let_two_requests_run_side_by_side():
    async def scenario():
        gate, order = asyncio.Event(), []
        app = FastAPI()
        app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=4, max_concurrent=2),
                           paths=("/work",))

        @app.get("/work")
        async def work(i: int):
            order.append(i)
            await gate.wait()
            return {"i": i}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            tasks = [asyncio.create_task(client.get("/work", params={"i": i})) for i in range(3)]
            await asyncio.sleep(0.05)
            running = sorted(order)
            gate.set()
            await asyncio.gather(*tasks)
        return running

    assert len(asyncio.run(scenario())) == 2


def test_an_unbounded_mixer_still_times_requests_for_the_quality_factor():
    async def scenario():
        latencies = []
        app = FastAPI()
        app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=0), paths=("/work",),
                           on_complete=latencies.append)

        @app.get("/work")
        async def work():
            await asyncio.sleep(0.03)
            return {}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            await asyncio.gather(*(client.get("/work") for _ in range(5)))
        return latencies

    latencies = asyncio.run(scenario())
    assert len(latencies) == 5 and min(latencies) >= 30.0


def test_the_front_doors_request_start_stamp_counts_as_queue_wait():
    """A request HAProxy stamped 200 ms ago (X-Request-Start, microseconds) reports that wait to the
    quality factor and the queue-wait histogram; a stamp that cannot be right is ignored."""
    import time

    from mixer.admission import upstream_wait_s

    now = time.time()

    def scope(value: str) -> dict:
        return {"headers": [(b"x-request-start", value.encode())]}

    assert upstream_wait_s(scope(f"t={int((now - 0.2) * 1e6)}"), now) == pytest.approx(0.2, abs=1e-3)
    assert upstream_wait_s(scope(f"t={int((now - 0.2) * 1e3)}"), now) == pytest.approx(0.2, abs=2e-3)  # ms
    assert upstream_wait_s(scope(f"{now - 0.2:.3f}"), now) == pytest.approx(0.2, abs=2e-3)  # seconds, no t=
    for bad in (f"t={int((now + 5) * 1e6)}", f"t={int((now - 3600) * 1e6)}", "t=soon", ""):
        assert upstream_wait_s(scope(bad), now) == 0.0, bad
    assert upstream_wait_s({"headers": []}, now) == 0.0

    async def scenario():
        waits, latencies = [], []
        app = FastAPI()
        app.add_middleware(InFlightLimitMiddleware, settings=OverloadSettings(max_in_flight=3), paths=("/work",),
                           on_complete=latencies.append, on_start=waits.append)

        @app.get("/work")
        async def work():
            return {}

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            stamp = int((time.time() - 0.2) * 1e6)
            await client.get("/work", headers={"X-Request-Start": f"t={stamp}"})
            await client.get("/work")
        return waits, latencies

    waits, latencies = asyncio.run(scenario())
    assert waits[0] >= 200.0 and latencies[0] >= 200.0  # the front door's queue is the caller's wait
    assert waits[1] < 50.0 and latencies[1] < 50.0
