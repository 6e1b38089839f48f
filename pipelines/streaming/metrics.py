"""Prometheus metrics of one stream processor, in its own registry (no process-global state).

Names (prefix ``hm_stream_``):

- ``events_total{topic,outcome}`` (counter): outcome ``applied`` | ``duplicate`` (already applied,
  idempotent no-op) | ``stale`` (an older social action than the last applied) | ``skipped`` (no
  feature write, e.g. post created) | ``failed`` (write error, left pending for a retry) |
  ``lost`` (trimmed from the stream before the group read it: ``EventBus.skip_trimmed``).
- ``event_to_online_seconds{topic}`` (histogram): write time - event time of each applied event,
  the freshness of the online features.
- ``event_to_online_p50_seconds`` / ``_p99_seconds{topic}`` (gauges): the same over the last
  ``lag_window`` applied events (dashboards read them directly; the histogram aggregates across
  processors with ``histogram_quantile``).
- ``consumer_lag_entries{topic,group}`` (gauge): entries not yet delivered to the group (NaN if
  Redis cannot tell); ``pending_entries{topic,group}``: delivered, not acknowledged;
  ``dead_letters{topic}``: entries in the dead-letter stream.

Served with ``StreamMetrics.serve(port, state=...)`` (``home-mixer stream run --metrics-port``), the
endpoint is recorded in ``<state>/run/stream_processor-<consumer>.json`` in the run-record layout of
``core.services`` (``service`` = ``stream_processor``, ``ports.metrics_port``, ``fields.host``), where
``home-mixer monitor start`` finds the scrape targets; :func:`forget_metrics_endpoint` removes the
record when the processor stops on purpose (a crashed one stays listed: Prometheus shows it down).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import prometheus_client as prom

from core.state import StateDir

SERVICE = "stream_processor"  # the run records' ``service``: the Prometheus job that scrapes them

# 1 ms .. 5 min: a healthy processor writes within milliseconds; a backlog shows as seconds to minutes.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class StreamMetrics:
    """All metrics of one stream processor, registered in ``self.registry``."""

    def __init__(self, registry: prom.CollectorRegistry | None = None):
        self.registry = registry or prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = prom.Counter("hm_stream_events_total", "Events consumed by outcome", ["topic", "outcome"],
                                   registry=r)
        self.lag = prom.Histogram("hm_stream_event_to_online_seconds",
                                  "Event time to online-store write time of applied events", ["topic"],
                                  buckets=LAG_BUCKETS, registry=r)
        self.lag_p50 = prom.Gauge("hm_stream_event_to_online_p50_seconds",
                                  "Median event-to-online lag over the recent applied events", ["topic"], registry=r)
        self.lag_p99 = prom.Gauge("hm_stream_event_to_online_p99_seconds",
                                  "99th percentile event-to-online lag over the recent applied events", ["topic"],
                                  registry=r)
        self.consumer_lag = prom.Gauge("hm_stream_consumer_lag_entries", "Entries not yet delivered to the group",
                                       ["topic", "group"], registry=r)
        self.pending = prom.Gauge("hm_stream_pending_entries", "Entries delivered but not acknowledged",
                                  ["topic", "group"], registry=r)
        self.dead_letters = prom.Gauge("hm_stream_dead_letters", "Entries in the dead-letter stream", ["topic"],
                                       registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return prom.generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1", *, state: StateDir | None = None, name: str = SERVICE):
        """Serve ``/metrics`` on ``addr:port`` (0 = any free port) in a daemon thread; returns
        ``(server, thread)`` (call ``server.shutdown()`` to stop). With ``state``, the port the server
        got is recorded as ``run/<name>.json`` (:func:`record_metrics_endpoint`) for Prometheus.

        Raises:
            OSError: the port is taken.
        """
        server, thread = prom.start_http_server(port, addr=addr, registry=self.registry)
        if state is not None:
            record_metrics_endpoint(state, name, server.server_port, addr)
        return server, thread


def record_name(consumer: str) -> str:
    """``stream_processor-<consumer>``, the consumer name reduced to file-name characters."""
    return f"{SERVICE}-{re.sub(r'[^A-Za-z0-9_.-]', '_', consumer)}"


def record_metrics_endpoint(state: StateDir, name: str, port: int, host: str = "127.0.0.1",
                            service: str = SERVICE) -> Path:
    """Write ``<state>/run/<name>.json`` = ``{"service": service, "ports": {"metrics_port": port},
    "fields": {"host": host}, "pid", "started_at"}`` atomically; returns its path. ``service`` is the
    Prometheus job that scrapes it (``stream_processor``; the fan-out workers' ``fanout_worker``).

    No ``create_time``: ``core.services.stop_recorded`` (``home-mixer clean``) only stops the
    services it started, and this processor runs in the foreground of its own command.
    """
    path = state.run / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"service": service, "ports": {"metrics_port": int(port)}, "fields": {"host": host},
                               "pid": os.getpid(), "started_at": time.time()}, indent=1) + "\n")
    os.replace(tmp, path)  # Prometheus' target refresh never reads half a file
    return path


def forget_metrics_endpoint(state: StateDir, name: str) -> None:
    """Remove ``run/<name>.json`` (a processor that stopped on purpose is no scrape target)."""
    (state.run / f"{name}.json").unlink(missing_ok=True)
