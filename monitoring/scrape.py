"""Read metrics straight from ``/metrics`` endpoints, for reports that run without a Prometheus
server (the demo, benches): counters summed over endpoints and PromQL's ``histogram_quantile``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families


class MetricsSnapshot:
    """The samples of one or more ``/metrics`` scrapes, summed over endpoints (label sets kept).

    Args:
        texts: Prometheus text expositions (one per endpoint).
    """

    def __init__(self, texts: list[str]):
        self.samples: dict[tuple[str, tuple], float] = defaultdict(float)
        for text in texts:
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    self.samples[(s.name, tuple(sorted(s.labels.items())))] += s.value

    @classmethod
    def scrape(cls, urls: list[str], timeout_s: float = 5.0) -> "MetricsSnapshot":
        """Scrape every URL (``http://host:port/metrics``).

        Raises:
            httpx.HTTPError: an endpoint did not answer 200.
        """
        texts = []
        for url in urls:
            r = httpx.get(url, timeout=timeout_s)
            r.raise_for_status()
            texts.append(r.text)
        return cls(texts)

    def value(self, name: str, **labels) -> float:
        """The sum of sample ``name`` over label sets that contain ``labels`` (0.0 if none)."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= set(ls))

    def histogram_quantile(self, name: str, q: float) -> float:
        """Quantile ``q`` of histogram ``name`` (its ``_bucket`` samples, all label sets summed),
        interpolated linearly inside the bucket as PromQL's ``histogram_quantile`` does (seconds
        for a ``_seconds`` histogram). NaN when it has no observations; the largest finite bound when
        the quantile falls in the ``+Inf`` bucket.

        Raises:
            ValueError: ``q`` outside [0, 1].
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        buckets: dict[float, float] = defaultdict(float)
        for (n, ls), v in self.samples.items():
            if n == f"{name}_bucket":
                buckets[float(dict(ls)["le"])] += v
        bounds = sorted(buckets)
        if not bounds or buckets[bounds[-1]] == 0:
            return math.nan
        rank = q * buckets[bounds[-1]]
        lower, below = 0.0, 0.0
        for le in bounds:
            if buckets[le] >= rank:
                if math.isinf(le):
                    return lower
                inside = buckets[le] - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 0.0)
            lower, below = le, buckets[le]
        return lower  # not reached: the last bucket holds every observation
