"""Prometheus metrics of one mixer instance, in its own registry (no process-global state).

Names (all prefixed ``hm_mixer_``): ``request_seconds`` (histogram), ``stage_seconds{stage}``
(histogram per pipeline stage), ``candidates_total{source}`` (counter), ``source_calls_total{source}``
(every call, failed or not), ``source_failures_total{source,reason}`` (timeout/error),
``filtered_total{filter}``, ``arm_requests_total{arm}``, ``served_items_total``,
``side_effect_failures_total{side_effect}``, ``model_version_info{model,version}`` (gauge = 1 for the
version in use), ``requests_total{status}``, ``scoring_total{model,path}``,
``scoring_fallbacks_total{model,backend,reason}``, ``model_reloads_total{model,outcome}``,
``head_score{head}`` (histogram of the heavy ranker's probability per head of every served post).
"""

from __future__ import annotations

import prometheus_client as prom

# Buckets in seconds, from 0.5 ms to 2.5 s: request stages are ms-scale, the whole request ~10-100 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# Probabilities, log-spaced below 0.1: engagement heads (follow, comment, hate) live at 0.1-1 %, click near 50 %.
SCORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class MixerMetrics:
    """All metrics of one mixer, registered in ``self.registry`` (render with ``render()``)."""

    def __init__(self, registry: prom.CollectorRegistry | None = None):
        self.registry = registry or prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_seconds = prom.Histogram("hm_mixer_request_seconds", "Home-timeline request latency",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.stage_seconds = prom.Histogram("hm_mixer_stage_seconds", "Latency per pipeline stage",
                                            ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.candidates = prom.Counter("hm_mixer_candidates_total", "Candidates returned per source",
                                       ["source"], registry=r)
        self.source_calls = prom.Counter("hm_mixer_source_calls_total",
                                         "Candidate source calls (ok, timeout or error)", ["source"], registry=r)
        self.source_failures = prom.Counter("hm_mixer_source_failures_total",
                                            "Candidate source calls skipped (fail-open)", ["source", "reason"],
                                            registry=r)
        self.filtered = prom.Counter("hm_mixer_filtered_total", "Candidates removed per filter", ["filter"],
                                     registry=r)
        self.arm_requests = prom.Counter("hm_mixer_arm_requests_total", "Requests per experiment arm", ["arm"],
                                         registry=r)
        self.served_items = prom.Counter("hm_mixer_served_items_total", "Posts returned in timelines", registry=r)
        self.side_effect_failures = prom.Counter("hm_mixer_side_effect_failures_total",
                                                 "Side effects that failed (fail-open)", ["side_effect"],
                                                 registry=r)
        self.model_version = prom.Gauge("hm_mixer_model_version_info", "Registered model version in use (1)",
                                        ["model", "version"], registry=r)
        self.requests = prom.Counter("hm_mixer_requests_total", "Requests by outcome", ["status"], registry=r)
        self.scoring = prom.Counter("hm_mixer_scoring_total", "Ranker calls by the path that served them "
                                    "(in_process, triton_grpc, triton_http, bentoml, in_process_fallback)",
                                    ["model", "path"], registry=r)
        self.scoring_fallbacks = prom.Counter("hm_mixer_scoring_fallbacks_total",
                                              "Remote ranker calls answered in-process instead",
                                              ["model", "backend", "reason"], registry=r)
        self.model_reloads = prom.Counter("hm_mixer_model_reloads_total",
                                          "Alias changes picked up without a restart", ["model", "outcome"],
                                          registry=r)
        self.head_score = prom.Histogram("hm_mixer_head_score", "Heavy ranker probability per head of served posts",
                                         ["head"], buckets=SCORE_BUCKETS, registry=r)

    def set_model_versions(self, versions: dict[str, str]) -> None:
        """Mark ``{model role: version}`` as the versions in use (gauge 1; previous versions removed)."""
        self.model_version.clear()
        for model, version in versions.items():
            self.model_version.labels(model=model, version=str(version)).set(1)

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return prom.generate_latest(self.registry)
