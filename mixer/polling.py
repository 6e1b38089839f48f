"""A daemon thread that calls ``check_once`` every ``interval_s`` seconds until stopped: what the
model alias watcher and the experiment config watcher share."""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class PeriodicCheck:
    """Base of a watcher: subclasses set ``interval_s`` and ``thread_name`` and implement
    ``check_once()``; ``start`` / ``stop`` run it in a daemon thread. An exception of one check is
    logged and the next check runs (a watcher must not die of one registry or file hiccup)."""

    interval_s: float
    thread_name: str = "hm-watcher"
    # called after each swap a check made (models or experiment): the mixer collects the old
    # models' reference cycles there (mixer.api._after_swap)
    after_swap: Callable[[], None] | None = None

    def check_once(self):
        raise NotImplementedError

    def swapped(self) -> None:
        """Run ``after_swap`` (if set); an exception is logged, the swap stands."""
        if self.after_swap is not None:
            try:
                self.after_swap()
            except Exception as e:  # noqa: BLE001
                log.warning("%s: after-swap hook failed: %r", self.thread_name, e)

    def start(self):
        """Poll in a daemon thread until ``stop``; returns self."""
        self._stop = threading.Event()

        def loop():
            while not self._stop.wait(self.interval_s):
                try:
                    self.check_once()
                except Exception as e:  # noqa: BLE001
                    log.warning("%s: check failed: %r", self.thread_name, e)

        self._thread = threading.Thread(target=loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling (waits up to 5 s for a check in progress)."""
        stop, thread = getattr(self, "_stop", None), getattr(self, "_thread", None)
        if stop is not None:
            stop.set()
        if thread is not None:
            thread.join(timeout=5)
