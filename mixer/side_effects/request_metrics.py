"""Records one request's stage timings, source outcomes, filter counts and arm in Prometheus."""

from __future__ import annotations

from mixer.components import SideEffect, TimelineResult
from mixer.metrics import MixerMetrics


class RequestMetricsSideEffect(SideEffect):
    """Turns a ``TimelineResult`` into metric observations (no I/O): request latency (s), status,
    one stage-latency observation per ``timings_ms`` stage (s), candidates and failures per source,
    removals per filter, requests per arm, served items.

    Runs ``after_total``: it sees every stage's time, "side_effects" and "total" included.
    """

    name = "request_metrics"
    after_total = True

    def __init__(self, metrics: MixerMetrics):
        self.metrics = metrics

    def apply(self, result: TimelineResult) -> None:
        """Record ``result`` in ``self.metrics`` (see ``mixer.metrics`` for the names)."""
        m = self.metrics
        if "total" in result.timings_ms:
            m.request_seconds.observe(result.timings_ms["total"] / 1000.0)
        m.requests.labels(status="degraded" if result.degraded else "ok").inc()
        for stage, ms in result.timings_ms.items():
            if stage != "total":
                m.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        for r in result.source_results:
            m.candidates.labels(source=r.name).inc(len(r.candidates))
            if r.status != "ok":
                m.source_failures.labels(source=r.name, reason=r.status).inc()
        for name, removed in result.filtered.items():
            m.filtered.labels(filter=name).inc(removed)
        m.arm_requests.labels(arm=result.query.arm or "none").inc()
        m.served_items.inc(len(result.items))
