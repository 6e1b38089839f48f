"""Records one request's stage timings, source outcomes, filter counts and arm in Prometheus."""

from __future__ import annotations

from mixer.metrics import MixerMetrics


class RequestMetricsSideEffect:
    """Turns a ``pipeline.TimelineResult`` into metric observations (no I/O)."""

    name = "request_metrics"

    def __init__(self, metrics: MixerMetrics):
        self.metrics = metrics

    def apply(self, result) -> None:
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
