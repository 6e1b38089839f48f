"""Admission control: a bounded number of requests in flight per worker, the rest refused at once.

Without a bound, a mixer past its capacity queues requests on its thread pool and every request
waits longer, until all of them miss the caller's deadline. Refusing the excess at the door with
``503`` and ``Retry-After`` keeps the admitted requests fast and tells the caller (the feed
service) to back off or try another replica. The bound is per worker process; the mixer's total
is ``workers x max_in_flight``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field


class OverloadSettings(BaseModel):
    """The ``overload`` section of the mixer config.

    Attributes:
        max_in_flight: requests of the guarded paths handled at once by one worker; more are
            refused with 503 (0 disables the bound).
        retry_after_s: the ``Retry-After`` header of a refusal (seconds).
    """

    model_config = ConfigDict(extra="forbid")

    max_in_flight: int = Field(8, ge=0)
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
    """

    def __init__(self, app, settings: OverloadSettings, paths: tuple[str, ...],
                 on_reject: Callable[[], None] | None = None, admit: Callable[[dict], bool] | None = None):
        self.app = app
        self.settings = settings
        self.paths = frozenset(paths)
        self.on_reject = on_reject
        self.admit = admit
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        """Guarded requests being handled now."""
        return self._in_flight

    async def __call__(self, scope, receive, send):
        limit = self.settings.max_in_flight
        if (scope["type"] != "http" or limit == 0 or scope.get("path") not in self.paths
                or (self.admit is not None and not self.admit(scope))):
            await self.app(scope, receive, send)
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
            await self.app(scope, receive, send)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _refuse(self, send, limit: int) -> None:
        body = json.dumps({"message": f"overloaded: {limit} requests in flight on this worker; "
                                      f"retry after {self.settings.retry_after_s} s"}).encode()
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"retry-after", str(self.settings.retry_after_s).encode())]})
        await send({"type": "http.response.body", "body": body})
