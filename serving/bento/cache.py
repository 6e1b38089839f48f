"""An LRU of loaded ranker versions per model, safe to share between request threads."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable


class RankerVersionCache:
    """Keeps the ``capacity`` most recently used versions of each model loaded.

    Two versions per model (the default) cover a rollout: the mixer moves from version n to n+1
    without a restart while requests still pinned to n are answered from memory.

    Args:
        load: ``load(name, version) -> handle``; its errors propagate and nothing is cached.
        capacity: versions kept per model name (>= 1); the least recently used one is dropped.

    Raises:
        ValueError: ``capacity < 1``.
    """

    def __init__(self, load: Callable[[str, int], Any], capacity: int = 2):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 version per model, got {capacity}")
        self._load = load
        self.capacity = capacity
        self._models: dict[str, OrderedDict[int, Any]] = {}
        self._lock = threading.Lock()
        # one lock per (name, version) being loaded: a version is downloaded once even when many
        # requests ask for it at the same moment, and loads of other versions are not blocked
        self._loading: dict[tuple[str, int], threading.Lock] = {}

    def _cached(self, name: str, version: int) -> Any | None:
        versions = self._models.get(name)
        if versions is not None and version in versions:
            versions.move_to_end(version)
            return versions[version]
        return None

    def get(self, name: str, version: int) -> Any:
        """The handle of ``name`` version ``version``, loaded on first use."""
        version = int(version)
        with self._lock:
            handle = self._cached(name, version)
            if handle is not None:
                return handle
            load_lock = self._loading.setdefault((name, version), threading.Lock())
        with load_lock:
            with self._lock:  # another thread may have loaded it while we waited
                handle = self._cached(name, version)
                if handle is not None:
                    return handle
            try:
                handle = self._load(name, version)
            except BaseException:
                with self._lock:
                    self._loading.pop((name, version), None)
                raise
            with self._lock:  # cache before forgetting the load lock: no second load can start
                versions = self._models.setdefault(name, OrderedDict())
                versions[version] = handle
                while len(versions) > self.capacity:
                    versions.popitem(last=False)
                self._loading.pop((name, version), None)
            return handle

    def loaded(self) -> dict[str, dict[int, Any]]:
        """``{name: {version: handle}}`` in least-to-most recently used order (a copy)."""
        with self._lock:
            return {name: dict(versions) for name, versions in self._models.items()}
