"""Records one request's stage timings, source outcomes, filter counts, arm and served head scores in Prometheus."""

from __future__ import annotations

from mixer.components import SideEffect, TimelineResult
from mixer.metrics import MixerMetrics


class RequestMetricsSideEffect(SideEffect):
    """Turns a ``TimelineResult`` into metric observations (no I/O): request latency (s), status,
    one stage-latency observation per ``timings_ms`` stage (s), calls, candidates and failures per
    source, removals per filter, requests per arm, served items, and each served post's heavy-ranker
    probability per head (``head_score{head}``; posts without heads or NaN scores are skipped).

    Runs ``after_total``: it sees every stage's time, "side_effects" and "total" included.
    """

    name = "request_metrics"
    after_total = True

    def __init__(self, metrics: MixerMetrics):
        self.metrics = metrics
        # head -> its histogram child: ``labels()`` takes a lock and a dict lookup, and a page has
        # page_size x heads observations; the set of heads is small and fixed per model.
        self._head_score: dict[str, object] = {}

    def apply(self, result: TimelineResult) -> None:
        """Record ``result`` in ``self.metrics`` (see ``mixer.metrics`` for the names)."""
        m = self.metrics
        if "total" in result.timings_ms:
            m.request_seconds.observe(result.timings_ms["total"] / 1000.0)
        # an empty page from failed stages is answered 503 by the API: unavailable, not degraded
        status = ("unavailable" if not result.items else "degraded") if result.degraded else "ok"
        m.requests.labels(status=status).inc()
        for stage, ms in result.timings_ms.items():
            if stage != "total":
                m.stage_seconds.labels(stage=stage).observe(ms / 1000.0)
        for r in result.source_results:
            m.source_calls.labels(source=r.name).inc()
            m.candidates.labels(source=r.name).inc(len(r.candidates))
            if r.status != "ok":
                m.source_failures.labels(source=r.name, reason=r.status).inc()
        for name, removed in result.filtered.items():
            m.filtered.labels(filter=name).inc(removed)
        m.arm_requests.labels(arm=result.query.arm or "none").inc()
        m.served_items.inc(len(result.items))
        children = self._head_score
        for item in result.items:
            for head, p in item.heads.items():
                child = children.get(head)
                if child is None:
                    child = children[head] = m.head_score.labels(head=head)
                p = float(p)
                if p == p:  # NaN (a failed head) would land in +Inf and poison the sum
                    child.observe(p)
