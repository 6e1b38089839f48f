"""The BentoML server's version LRU and binary wire format, without a server."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from serving.bento.cache import RankerVersionCache
from serving.bento.protocol import WireFormatError, decode_matrix, encode_matrix, format_shape, parse_shape


class CountingLoader:
    """Records each (name, version) load; ``fail`` names versions whose load raises."""

    def __init__(self, delay_s: float = 0.0, fail: set[int] = frozenset()):
        self.calls: list[tuple[str, int]] = []
        self.delay_s, self.fail = delay_s, set(fail)
        self._lock = threading.Lock()

    def __call__(self, name: str, version: int):
        with self._lock:
            self.calls.append((name, version))
        time.sleep(self.delay_s)
        if version in self.fail:
            raise LookupError(f"{name} has no version {version}")
        return (name, version, object())


def test_cache_keeps_the_most_recent_versions_per_model():
    load = CountingLoader()
    cache = RankerVersionCache(load, capacity=2)
    a1 = cache.get("a", 1)
    cache.get("a", 2)
    assert cache.get("a", 1) is a1  # a hit refreshes version 1: version 2 is now the oldest
    cache.get("a", 3)
    cache.get("b", 1)  # another model has its own slots
    assert {n: list(v) for n, v in cache.loaded().items()} == {"a": [1, 3], "b": [1]}
    cache.get("a", 2)
    assert load.calls == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("a", 2)]


def test_cache_loads_a_version_once_under_concurrency():
    load = CountingLoader(delay_s=0.1)
    cache = RankerVersionCache(load)
    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get("a", 7))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert load.calls == [("a", 7)]
    assert all(r is results[0] for r in results)


def test_cache_does_not_keep_failed_loads():
    load = CountingLoader(fail={5})
    cache = RankerVersionCache(load)
    for _ in range(2):
        with pytest.raises(LookupError):
            cache.get("a", 5)
    assert load.calls == [("a", 5), ("a", 5)] and cache.loaded() == {}


def test_cache_rejects_zero_capacity():
    with pytest.raises(ValueError, match="capacity must be >= 1"):
        RankerVersionCache(CountingLoader(), capacity=0)


def test_matrix_round_trip_keeps_nan_and_is_little_endian():
    x = np.array([[1.5, np.nan, -2.0], [np.inf, 0.0, 3.25]], dtype=np.float64)
    body = encode_matrix(x)
    assert body == x.astype("<f4").tobytes()
    y = decode_matrix(body, parse_shape(format_shape(x.shape)))
    assert y.dtype == np.float32 and y.flags.writeable
    np.testing.assert_array_equal(y, x.astype(np.float32))
    big_endian = np.ascontiguousarray(x, dtype=">f4")
    assert encode_matrix(big_endian) == body


@pytest.mark.parametrize("value, fragment", [
    (None, "missing header X-Shape"), ("3", "two integers"), ("3,x", "two integers"),
    ("-1,4", "rows >= 0"), ("2,0", "columns >= 1"),
])
def test_parse_shape_explains_bad_headers(value, fragment):
    with pytest.raises(WireFormatError, match=fragment):
        parse_shape(value)


def test_decode_checks_the_body_length():
    with pytest.raises(WireFormatError, match="body has 8 bytes but X-Shape=2,2 needs 16"):
        decode_matrix(b"\0" * 8, (2, 2))
    with pytest.raises(WireFormatError, match="2-D"):
        encode_matrix(np.zeros(3))
