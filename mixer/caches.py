"""Per-process caches of what every request shares, keyed by the online store's versions; their
values double as last-known-good (LKG) answers while Redis is down.

Why: post metadata, the content-view feature rows of posts and the candidate lists (popular, per
tag, per author) change only when the candidate index is rebuilt or ``materialize`` runs (hourly
at most), yet every request read ~890 posts' worth of them (feature hydration alone was 21 of
38 ms). User-keyed reads (user context, user x author / user x tag features) and the stream
processor's real-time counts stay per request: they change per event and are not shared.

Versions (``StoreVersions``): the candidate index's ``INDEX_META`` (``as_of`` + ``built_at``) and
``FEATURE_VERSION`` (bumped by every ``materialize``). ``mixer.redis_health.StoreWatcher`` reads
both in one round trip every ``caches.version_check_s`` (2 s by default) from a background thread
and drops a cache whose version changed, so a new build is served within seconds and the request
path pays no version read at all.

LKG: when a Redis read fails, a component serves what its cache holds, whatever the version
(nothing newer can be read anyway), and reports its stage degraded (``mixer.components.Fallback``).

Bounds: entries and approximate bytes (``sizeof`` per value, an estimate of the Python objects;
evicting least recently used first). One lock per cache: a lookup of ~900 keys takes it once.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable

from pydantic import BaseModel, ConfigDict, Field

MISSING = object()  # a key the cache does not hold (None is a value: "the store has no such post")


class CacheSettings(BaseModel):
    """The ``caches`` section of the mixer config.

    Attributes:
        enabled: cache the shared reads (False: every request reads Redis, no LKG but user context).
        version_check_s: poll the index / feature versions this often (s); a new build is served
            within about this long.
        max_entries: entries per cache (posts, authors, tags...).
        max_mb: approximate memory per cache (MiB, Python objects estimated).
        user_context_entries: users whose last context is kept for Redis outages (LKG only:
            never served while Redis answers).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    version_check_s: float = Field(2.0, gt=0)
    max_entries: int = Field(200_000, ge=1)
    max_mb: float = Field(64.0, gt=0)
    user_context_entries: int = Field(10_000, ge=0)


def approx_sizeof(value: Any) -> int:
    """Rough bytes of a cached value: numpy arrays by ``nbytes``, lists / tuples by their items
    (one level deep), anything else by ``sys.getsizeof``. An estimate for the byte bound, not an
    accounting."""
    nbytes = getattr(value, "nbytes", None)
    if nbytes is not None:
        return int(nbytes) + 112
    if isinstance(value, (list, tuple)):  # items are alike (rows of one kind): size the first
        return sys.getsizeof(value) + len(value) * (approx_sizeof(value[0]) if value else 0)
    return sys.getsizeof(value)


class VersionedCache:
    """A bounded LRU map valid for one store version; thread-safe.

    Args:
        name: the ``cache`` label of ``hm_mixer_cache_requests_total``.
        max_entries, max_bytes: bounds (least recently used evicted first).
        sizeof: bytes of one value (default ``approx_sizeof``).
        on_lookup: ``(cache name, result, n)`` after a lookup, result "hit" / "miss" / "lkg"
            (metrics; None: not counted).

    Raises:
        ValueError: a bound < 1.
    """

    def __init__(self, name: str, max_entries: int, max_bytes: int, *,
                 sizeof: Callable[[Any], int] = approx_sizeof,
                 on_lookup: Callable[[str, str, int], None] | None = None):
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"cache {name}: max_entries and max_bytes must be >= 1, got {max_entries}, {max_bytes}")
        self.name = name
        self.max_entries = int(max_entries)
        self.max_bytes = int(max_bytes)
        self.sizeof = sizeof
        self.on_lookup = on_lookup
        self._data: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._version: str | None = None
        self._lock = threading.Lock()

    @property
    def version(self) -> str | None:
        """The store version the entries belong to (None before the first ``set_version``)."""
        return self._version

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        """Approximate bytes held."""
        return self._bytes

    def set_version(self, version: str | None) -> bool:
        """Make ``version`` current; entries of another version are dropped. Returns True if it changed."""
        with self._lock:
            if version == self._version:
                return False
            self._version = version
            self._data.clear()
            self._bytes = 0
            return True

    def get_many(self, keys: Iterable[Hashable], *, lkg: bool = False) -> tuple[dict[Hashable, Any], list[Hashable]]:
        """``({key: value} of the keys held, [keys not held, in input order])``; counted as hits and
        misses (or as "lkg" when ``lkg``: served because Redis failed)."""
        found: dict[Hashable, Any] = {}
        missing: list[Hashable] = []
        data = self._data
        with self._lock:
            for k in keys:
                entry = data.get(k)
                if entry is None:
                    missing.append(k)
                else:
                    data.move_to_end(k)
                    found[k] = entry[0]
        if self.on_lookup is not None:
            if found:
                self.on_lookup(self.name, "lkg" if lkg else "hit", len(found))
            if missing and not lkg:
                self.on_lookup(self.name, "miss", len(missing))
        return found, missing

    def get(self, key: Hashable, *, lkg: bool = False) -> Any:
        """The value of ``key`` or ``MISSING`` (counted like ``get_many``)."""
        found, _ = self.get_many((key,), lkg=lkg)
        return found.get(key, MISSING)

    def put_many(self, items: dict[Hashable, Any], version: str | None) -> None:
        """Store ``items`` read under ``version``; ignored if the version changed meanwhile (a read
        that started before a rebuild must not fill the new version with old values)."""
        if not items:
            return
        sized = [(k, v, self.sizeof(v)) for k, v in items.items()]
        with self._lock:
            if version != self._version:
                return
            data = self._data
            for k, v, size in sized:
                old = data.pop(k, None)
                if old is not None:
                    self._bytes -= old[1]
                data[k] = (v, size)
                self._bytes += size
            while data and (len(data) > self.max_entries or self._bytes > self.max_bytes):
                _, (_, size) = data.popitem(last=False)
                self._bytes -= size

    def put(self, key: Hashable, value: Any, version: str | None) -> None:
        """``put_many({key: value}, version)``."""
        self.put_many({key: value}, version)

    def clear(self) -> None:
        """Drop every entry (the version stays)."""
        with self._lock:
            self._data.clear()
            self._bytes = 0


@dataclass(frozen=True)
class StoreVersions:
    """The online store's versions as last read (None: never written / not read yet).

    Attributes:
        index: candidate index ``"<as_of>|<built_at>"`` of ``INDEX_META``.
        index_as_of: the index cutoff, epoch s (NaN-free float or None).
        features: ``FEATURE_VERSION`` (the wall time of the last ``materialize``), or None when
            the store was filled without it (then a new fill is picked up only by a restart).
    """

    index: str | None = None
    index_as_of: float | None = None
    features: str | None = None


class MixerCaches:
    """The caches of one mixer process, created once and shared by every pipeline declaration
    (a model swap keeps them). Index-versioned: ``post_meta``, ``popular``, ``tag_posts``,
    ``author_posts``; feature-versioned: ``post_features``; LKG-only (served only when Redis
    fails): ``user_context``, ``trending``.

    Args:
        settings: ``CacheSettings``.
        on_lookup: metrics callback (``VersionedCache``).
    """

    INDEX_CACHES = ("post_meta", "popular", "tag_posts", "author_posts", "coengagement")
    FEATURE_CACHES = ("post_features",)

    def __init__(self, settings: CacheSettings, on_lookup: Callable[[str, str, int], None] | None = None):
        self.settings = settings
        max_bytes = int(settings.max_mb * 2**20)

        def make(name: str, entries: int | None = None, sizeof: Callable[[Any], int] = approx_sizeof) -> VersionedCache:
            return VersionedCache(name, entries or settings.max_entries, max_bytes, sizeof=sizeof, on_lookup=on_lookup)

        self.post_meta = make("post_meta")
        self.popular = make("popular", 16)
        self.tag_posts = make("tag_posts")
        self.author_posts = make("author_posts")
        self.coengagement = make("coengagement")  # post -> its co-engagement neighbours
        self.post_features = make("post_features")
        # a context is a few sets / dicts of ints: ~70 bytes per member in CPython
        self.user_context = make("user_context", max(1, settings.user_context_entries),
                                 sizeof=lambda ctx: 1024 + 70 * sum(len(v) for v in ctx.values()))
        self.trending = make("trending", 16)
        self.versions = StoreVersions()
        for lkg_only in (self.user_context, self.trending):
            lkg_only.set_version("lkg")

    @property
    def enabled(self) -> bool:
        """``caches.enabled``."""
        return self.settings.enabled

    def apply_versions(self, versions: StoreVersions) -> list[str]:
        """Make ``versions`` current; returns the names of the caches dropped by a change."""
        dropped = []
        for name in self.INDEX_CACHES:
            if getattr(self, name).set_version(versions.index) and self.versions.index is not None:
                dropped.append(name)
        for name in self.FEATURE_CACHES:
            if getattr(self, name).set_version(versions.features) and self.versions.features is not None:
                dropped.append(name)
        self.versions = versions
        return dropped

    def warm(self) -> bool:
        """True if anything shared is cached (a Redis outage can still be answered)."""
        return bool(len(self.popular) or len(self.post_meta))

    def summary(self) -> dict[str, Any]:
        """``{"versions": {...}, "entries": {cache: n}, "mb": {cache: approx MiB}}`` (``/healthz``)."""
        names = (*self.INDEX_CACHES, *self.FEATURE_CACHES, "user_context", "trending")
        return {"versions": {"index": self.versions.index, "features": self.versions.features},
                "entries": {n: len(getattr(self, n)) for n in names},
                "mb": {n: round(getattr(self, n).bytes / 2**20, 2) for n in names}}


__all__ = ["CacheSettings", "MISSING", "MixerCaches", "StoreVersions", "VersionedCache", "approx_sizeof"]
