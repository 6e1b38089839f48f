"""Prometheus metrics of one mixer instance, in its own registry (no process-global state).

Names (all prefixed ``hm_mixer_``): ``request_seconds`` (histogram, the pipeline),
``queue_wait_seconds`` (histogram: admitted requests waiting for an execution slot before the
pipeline), ``stage_seconds{stage}`` (histogram per pipeline stage), ``candidates_total{source}``
(counter), ``source_calls_total{source}`` (every call, failed or not),
``source_failures_total{source,reason}`` (timeout/error), ``filtered_total{filter}``,
``arm_requests_total{arm}``, ``served_items_total``,
``side_effect_failures_total{side_effect}``, ``model_version_info{model,version}`` (gauge = 1 for the
version in use), ``requests_total{status}``, ``scoring_total{model,path}``,
``scoring_fallbacks_total{model,backend,reason}``, ``circuit_state{backend,model}`` (0 closed,
1 half-open, 2 open), ``model_reloads_total{model,outcome}``,
``head_score{head}`` (histogram of the heavy ranker's probability per head of every served post),
``cache_requests_total{cache,result}`` (shared-cache lookups: hit, miss, lkg),
``side_effect_buffer_dropped_total{side_effect}`` / ``side_effect_buffer_flushed_total{side_effect}``
(writes buffered during a Redis outage), ``side_effect_unreplicated_total{side_effect}`` (HA: writes
no replica acknowledged in time), ``redis_outages_total``, ``redis_primary_outages_total`` (HA: the
primary unreachable while reads went on from a replica), ``shadow_requests_total{outcome}`` (shadow
scoring: scored, dropped with the queue full, failed), ``config_reloads_total{outcome}`` (a changed
config file: applied, invalid, failed, restart_needed).
"""

from __future__ import annotations

import prometheus_client as prom

# Buckets in seconds, from 0.5 ms to 2.5 s: request stages are ms-scale, the whole request ~10-100 ms.
# 75 and 150 ms resolve the latency targets (p99 <= 100 ms sustained, <= 150 ms admitted under 2x load).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
# Probabilities, log-spaced below 0.1: engagement heads (follow, comment, hate) live at 0.1-1 %, click near 50 %.
SCORE_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0)


class MixerMetrics:
    """All metrics of one mixer, registered in ``self.registry`` (render with ``render()``).

    Args:
        registry: where the metrics register (default: a fresh one; no process-global state).
        multiprocess_dir: the ``PROMETHEUS_MULTIPROC_DIR`` of a mixer served by several worker
            processes (``python -m mixer.api --workers N``): prometheus_client then keeps every
            value in a file per process there, and ``render()`` sums the workers' files
            (``MultiProcessCollector``), so a scrape that lands on any worker sees the whole mixer.
            The variable must have been set before ``prometheus_client`` was imported.
    """

    def __init__(self, registry: prom.CollectorRegistry | None = None, multiprocess_dir: str | None = None):
        self.registry = registry or prom.CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self._versions: dict[str, str] = {}
        r = self.registry
        self.request_seconds = prom.Histogram("hm_mixer_request_seconds", "Home-timeline request latency",
                                              buckets=LATENCY_BUCKETS, registry=r)
        # mixer.admission: admitted requests wait here for an execution slot (request_seconds
        # starts after it), after any wait in the front door's queue (X-Request-Start); the caller sees both
        self.queue_wait_seconds = prom.Histogram("hm_mixer_queue_wait_seconds", "Wait of an admitted "
                                                 "home-timeline request for an execution slot",
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
        # max over workers: every worker runs the same versions once a reload has reached them all
        self.model_version = prom.Gauge("hm_mixer_model_version_info", "Registered model version in use (1)",
                                        ["model", "version"], registry=r, multiprocess_mode="livemax")
        self.requests = prom.Counter("hm_mixer_requests_total", "Requests by outcome", ["status"], registry=r)
        self.scoring = prom.Counter("hm_mixer_scoring_total", "Ranker calls by the path that served them "
                                    "(in_process, triton_grpc, triton_http, bentoml, in_process_fallback)",
                                    ["model", "path"], registry=r)
        self.scoring_fallbacks = prom.Counter("hm_mixer_scoring_fallbacks_total",
                                              "Remote model calls (rankers, two-tower user tower) answered in-process instead",
                                              ["model", "backend", "reason"], registry=r)
        # max over workers: the worst breaker of any worker
        self.circuit_state = prom.Gauge("hm_mixer_circuit_state", "Model-server circuit breaker per model "
                                        "(0 closed, 1 half-open, 2 open: scored in-process without calling)",
                                        ["backend", "model"], registry=r, multiprocess_mode="livemax")
        self.model_reloads = prom.Counter("hm_mixer_model_reloads_total",
                                          "Alias changes picked up without a restart", ["model", "outcome"],
                                          registry=r)
        # liveall: one series per worker process (each sheds load on its own latency)
        self.quality_factor = prom.Gauge("hm_mixer_quality_factor", "Share of the full work per request "
                                         "(mixer.quality_factor: source limits and heavy top K scale by it)",
                                         registry=r, multiprocess_mode="liveall")
        self.quality_factor.set(1.0)
        self.head_score = prom.Histogram("hm_mixer_head_score", "Heavy ranker probability per head of served posts",
                                         ["head"], buckets=SCORE_BUCKETS, registry=r)
        # mixer.caches: one count per key looked up; hit rate = hit / (hit + miss); "lkg" = served
        # from the cache because Redis failed
        self.cache_requests = prom.Counter("hm_mixer_cache_requests_total",
                                           "Shared-cache lookups per key (hit, miss, lkg)", ["cache", "result"],
                                           registry=r)
        # mixer.side_effects.write_buffer: writes Redis could not take, flushed later or dropped past the bound
        self.side_effect_buffer_dropped = prom.Counter("hm_mixer_side_effect_buffer_dropped_total",
                                                       "Buffered side-effect writes dropped past the bound",
                                                       ["side_effect"], registry=r)
        self.side_effect_buffer_flushed = prom.Counter("hm_mixer_side_effect_buffer_flushed_total",
                                                       "Buffered side-effect writes written after an outage",
                                                       ["side_effect"], registry=r)
        self.shadow_requests = prom.Counter("hm_mixer_shadow_requests_total",
                                            "Requests sampled for shadow scoring by outcome (scored, dropped: "
                                            "queue full, failed)", ["outcome"], registry=r)
        self.config_reloads = prom.Counter("hm_mixer_config_reloads_total",
                                           "Config file changes seen by outcome (applied, invalid, failed, "
                                           "restart_needed)", ["outcome"], registry=r)
        self.redis_outages = prom.Counter("hm_mixer_redis_outages_total",
                                          "Times Redis became unreachable (served from caches meanwhile)",
                                          registry=r)
        self.side_effect_unreplicated = prom.Counter(
            "hm_mixer_side_effect_unreplicated_total",
            "Side-effect writes the Redis primary took but no replica acknowledged in time (HA: lost if the "
            "primary dies before the replica catches up)", ["side_effect"], registry=r)
        self.redis_primary_outages = prom.Counter(
            "hm_mixer_redis_primary_outages_total",
            "Times the Redis primary became unreachable for writes (HA: reads went on from a replica, "
            "writes were buffered)", registry=r)

    def set_model_versions(self, versions: dict[str, str]) -> None:
        """Mark ``{model role: version}`` as the versions in use (gauge 1; previous versions removed,
        or set to 0 with worker processes, whose files cannot drop a label)."""
        if self.multiprocess_dir:
            for model, version in self._versions.items():
                if versions.get(model) != version:
                    self.model_version.labels(model=model, version=version).set(0)
        else:
            self.model_version.clear()
        self._versions = {m: str(v) for m, v in versions.items()}
        for model, version in self._versions.items():
            self.model_version.labels(model=model, version=version).set(1)

    def set_circuit_state(self, backend: str, model: str, state: str) -> None:
        """Record a circuit breaker's state (``"closed"``, ``"half-open"`` or ``"open"``, pybreaker's
        names); the listener of ``mixer.scorers.remote.CircuitBreakers``.

        Raises:
            ValueError: another state name.
        """
        codes = {"closed": 0, "half-open": 1, "open": 2}
        if state not in codes:
            raise ValueError(f"unknown circuit state {state!r}: expected one of {sorted(codes)}")
        self.circuit_state.labels(backend=backend, model=model).set(codes[state])

    def process_exits(self) -> None:
        """Drop this worker's gauges from the shared folder when it stops (``live*`` modes), so a
        replaced worker's last breaker state or model version does not linger. A worker killed
        outright cannot do this; ``render`` drops its gauges at the next scrape."""
        if self.multiprocess_dir:
            import os

            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)

    def render(self) -> bytes:
        """Prometheus text exposition: this registry, or every worker's values summed."""
        if not self.multiprocess_dir:
            return prom.generate_latest(self.registry)
        from prometheus_client import multiprocess

        self._drop_dead_workers()
        registry = prom.CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        return prom.generate_latest(registry)

    def _drop_dead_workers(self) -> None:
        """``mark_process_dead`` for every pid of a ``gauge_live*_<pid>.db`` file whose process is
        gone (a SIGKILLed worker): its live gauges would otherwise be reported for ever. Counters
        and histograms of the dead keep counting (their files stay: totals must not go down)."""
        import re
        from pathlib import Path

        import psutil
        from prometheus_client import multiprocess

        for f in Path(self.multiprocess_dir).glob("gauge_live*_*.db"):
            m = re.search(r"_(\d+)\.db$", f.name)
            if m and not psutil.pid_exists(int(m[1])):
                multiprocess.mark_process_dead(int(m[1]), self.multiprocess_dir)
