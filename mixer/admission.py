"""Admission control: a bounded number of requests in flight per worker, the rest refused at once.

Without a bound, a mixer past its capacity queues requests on its thread pool and every request
waits longer, until all of them miss the caller's deadline. Refusing the excess at the door with
``503`` and ``Retry-After`` keeps the admitted requests fast and tells the caller (the feed
service) to back off or try another replica. The bound is per worker process; the mixer's total
is ``workers x max_in_flight``.

Of the admitted requests, at most ``max_concurrent`` run the pipeline at once; the others wait
their turn in arrival order. A ranking request is CPU-bound Python: run side by side in threads,
requests share the GIL and every one of them takes ``k`` times longer (processor sharing, plus
the convoy of GIL hand-offs around each Redis round trip). Served one after another, the first
finishes at once and the wait is bounded by the queue: with ``S`` ms of work per request, an
admitted request is answered within about ``max_in_flight x S`` ms.

Behind a front door (``mixer.haproxy``: HAProxy queues what the replicas cannot take yet), a request
may have waited before this process saw it. The front door stamps each request with
``X-Request-Start: t=<microseconds since the epoch>`` (the convention of Heroku's router and New
Relic's queue time), and the wait before arrival counts as queue wait here: the quality factor and
the queue-wait histogram see what the caller saw, wherever the request queued.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field


REQUEST_START_HEADER = b"x-request-start"
MAX_UPSTREAM_WAIT_S = 60.0  # a stamp older than this (or in the future) is a clock problem: ignored


def upstream_wait_s(scope: dict, now_s: float) -> float:
    """Seconds a request waited before it reached this process, from its ``X-Request-Start`` header
    (``t=<epoch time>`` in seconds, milliseconds or microseconds, told apart by magnitude as New
    Relic does; HAProxy sends microseconds).

    Args:
        scope: the ASGI scope (its raw headers).
        now_s: the wall clock now (``time.time()``).

    Returns:
        The wait in seconds; 0.0 without the header, or when it is unreadable, in the future or
        older than ``MAX_UPSTREAM_WAIT_S`` (clocks that disagree must not shed quality).
    """
    for name, value in scope.get("headers") or ():
        if name.lower() != REQUEST_START_HEADER:
            continue
        text = value.decode("latin-1").strip()
        try:
            stamp = float(text[2:] if text.startswith("t=") else text)
        except ValueError:
            return 0.0
        stamp_s = stamp / 1e6 if stamp > 1e14 else stamp / 1e3 if stamp > 1e11 else stamp
        wait = now_s - stamp_s
        return wait if 0.0 <= wait <= MAX_UPSTREAM_WAIT_S else 0.0
    return 0.0


class OverloadSettings(BaseModel):
    """The ``overload`` section of the mixer config.

    Attributes:
        max_in_flight: requests of the guarded paths one worker holds at once, running or
            waiting; more are refused with 503 (0 disables the bound and the queue).
        max_concurrent: of those, how many run the pipeline at once (the rest wait in arrival
            order); 1 suits CPU-bound ranking under the GIL (see the module docstring).
        retry_after_s: the ``Retry-After`` header of a refusal (seconds).
    """

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(3, ge=0)
    max_concurrent: int = Field(1, ge=1)
    retry_after_s: int = Field(1, ge=0)


class InFlightLimitMiddleware:
    """ASGI middleware: at most ``max_in_flight`` requests on ``paths`` at once, else ``503``.

    A refusal costs no thread and no Redis call: it is answered before the route runs, with
    ``{"message": ...}`` and ``Retry-After``. Other paths (``/healthz``, ``/metrics``) always pass.

    Args:
        app: the ASGI app.
        settings: ``OverloadSettings``.
        paths: the guarded request paths.
        on_reject: called once per refusal (e.g. a metric).
        admit: which requests take a slot (e.g. those with a valid bearer token); the others pass
            uncounted, to be refused by the route at no cost, so they cannot crowd out callers.
        on_complete: called with each admitted request's latency (ms, float) from arrival to the
            end of its answer, queue wait included: what the caller saw (e.g. the quality factor).
            Arrival is when the front door stamped the request (:func:`upstream_wait_s`), if it did.
        on_start: called with each admitted request's wait for an execution slot (ms, float), as
            it starts (e.g. a queue-wait histogram); the front door's queue included.
    """

    def __init__(self, app, settings: OverloadSettings, paths: tuple[str, ...],
                 on_reject: Callable[[], None] | None = None, admit: Callable[[dict], bool] | None = None,
                 on_complete: Callable[[float], None] | None = None,
                 on_start: Callable[[float], None] | None = None):
        self.app = app
        self.settings = settings
        self.paths = frozenset(paths)
        self.on_reject = on_reject
        self.admit = admit
        self.on_complete = on_complete
        self.on_start = on_start
        self._in_flight = 0
        self._lock = threading.Lock()
        self._slots: asyncio.Semaphore | None = None  # made on the server's loop, at first use

    @property
    def in_flight(self) -> int:
        """Guarded requests being handled now."""
        return self._in_flight

    async def __call__(self, scope, receive, send):
        limit = self.settings.max_in_flight
        if (scope["type"] != "http" or scope.get("path") not in self.paths
                or (self.admit is not None and not self.admit(scope))):
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter() - upstream_wait_s(scope, time.time())
        if limit == 0:  # no bound and no queue: still timed, for the quality factor
            try:
                await self.app(scope, receive, send)
            finally:
                self._completed(arrived)
            return
        with self._lock:
            admitted = self._in_flight < limit
            if admitted:
                self._in_flight += 1
        if not admitted:
            if self.on_reject is not None:
                self.on_reject()
            await self._refuse(send, limit)
            return
        try:
            if self._slots is None:
                self._slots = asyncio.Semaphore(self.settings.max_concurrent)
            async with self._slots:  # FIFO: asyncio wakes waiters in the order they came
                if self.on_start is not None:
                    self.on_start((time.perf_counter() - arrived) * 1000.0)
                await self.app(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight -= 1
            self._completed(arrived)

    def _completed(self, arrived: float) -> None:
        if self.on_complete is not None:
            self.on_complete((time.perf_counter() - arrived) * 1000.0)

    async def _refuse(self, send, limit: int) -> None:
        body = json.dumps({"message": f"overloaded: {limit} requests in flight on this worker; "
                                      f"retry after {self.settings.retry_after_s} s"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.settings.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body})
