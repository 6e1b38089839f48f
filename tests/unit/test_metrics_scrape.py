"""``monitoring.scrape``: samples summed over endpoints and PromQL's histogram_quantile, checked
against a real prometheus_client histogram."""

from __future__ import annotations

import math

import numpy as np
import prometheus_client as prom
import pytest

from monitoring.scrape import MetricsSnapshot


def _exposition(values, buckets=(0.01, 0.05, 0.1, 0.5, 1.0)):
    r = prom.CollectorRegistry()
    h = prom.Histogram("x_lag_seconds", "lag", buckets=buckets, registry=r)
    c = prom.Counter("x_posts_total", "posts", ["outcome"], registry=r)
    for v in values:
        h.observe(v)
        c.labels(outcome="ok" if v < 0.5 else "slow").inc()
    return prom.generate_latest(r).decode()


def test_quantiles_interpolate_inside_buckets_and_sum_over_endpoints():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0, 0.1, 600), rng.uniform(0, 0.1, 400)
    snap = MetricsSnapshot([_exposition(a), _exposition(b)])
    assert snap.value("x_posts_total", outcome="ok") == 1000
    assert snap.value("x_lag_seconds_count") == 1000
    # uniform on [0, 0.1]: linear interpolation inside the buckets recovers the quantiles closely
    for q in (0.1, 0.5, 0.9):
        assert snap.histogram_quantile("x_lag_seconds", q) == pytest.approx(q * 0.1, abs=0.006)


def test_empty_histogram_and_inf_bucket_and_bad_q():
    assert math.isnan(MetricsSnapshot([_exposition([])]).histogram_quantile("x_lag_seconds", 0.5))
    # everything above the largest bound: the largest finite bound, as PromQL answers
    assert MetricsSnapshot([_exposition([5.0, 7.0])]).histogram_quantile("x_lag_seconds", 0.99) == 1.0
    with pytest.raises(ValueError, match="q must be in"):
        MetricsSnapshot([]).histogram_quantile("x_lag_seconds", 1.5)
