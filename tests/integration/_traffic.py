"""Steady timeline traffic for the fault tests: ``threads`` clients posting home-timeline requests
on a fixed schedule (``rate_hz`` in all, evenly spread), each on its own keep-alive connection, so a
fault meets requests in flight on every worker. Each answer is recorded as
``(answered_at, user, status, degraded, sent_at, message)`` (wall-clock seconds; status -1 when
no HTTP answer came; degraded only for 200s; message: the start of a non-200 answer's body, or of
the client's error, so a failure says which refusal it was)."""

from __future__ import annotations

import threading
import time

import httpx


class PacedLoad:
    """Context manager: starts the clients on enter, stops and joins them on exit.

    Args:
        base: the mixer's base URL.
        users: user ids, taken round robin (each client from its own offset).
        rate_hz: requests per second over all clients (a client that falls behind sends at once).
        threads: concurrent clients.
        headers: sent with every request (the bearer token).
    """

    def __init__(self, base: str, users: list[int], rate_hz: float, threads: int = 4,
                 headers: dict[str, str] | None = None):
        self.base, self.users, self.rate_hz, self.headers = base, users, rate_hz, headers or {}
        self.records: list[tuple[float, int, int, list[str] | None, float, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i, threads), daemon=True) for i in range(threads)]

    def _run(self, index: int, n: int) -> None:
        interval = n / self.rate_hz
        next_at = time.monotonic() + index * interval / n  # the clients interleave
        i = index
        with httpx.Client(base_url=self.base, timeout=10, headers=self.headers) as http:
            while not self._stop.wait(max(0.0, next_at - time.monotonic())):
                next_at = max(next_at + interval, time.monotonic())
                user = self.users[i % len(self.users)]
                i += n
                sent = time.time()
                message = ""
                try:
                    r = http.post("/v1/home-timeline", json={"user_id": user, "limit": 10})
                    status = r.status_code
                    degraded = r.json().get("degraded") if status == 200 else None
                    if status != 200:
                        message = r.text[:300]
                except httpx.HTTPError as e:
                    status, degraded, message = -1, None, repr(e)[:300]  # no answer at all: an error
                with self._lock:
                    self.records.append((time.time(), user, status, degraded, sent, message))

    def __enter__(self) -> "PacedLoad":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)

    @property
    def achieved_hz(self) -> float:
        """Answers per second between the first send and the last answer."""
        with self._lock:
            if len(self.records) < 2:
                return 0.0
            return len(self.records) / (max(r[0] for r in self.records) - min(r[4] for r in self.records))
