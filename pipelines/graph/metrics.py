"""Prometheus metrics of one fan-out worker, in its own registry (no process-global state).

Names (prefix ``hm_fanout_``):

- ``posts_total{outcome}`` (counter): ``fanned_out`` (pushed to every follower) | ``celebrity_skipped``
  (author above ``fanout.celebrity_threshold`` followers: own timeline only, pulled at read) |
  ``duplicate`` (already fanned out: a redelivery) | ``failed`` (a Redis error: left pending, retried).
- ``deliveries_total`` (counter): timeline entries newly written (``ZADD`` returned 1); its rate is
  deliveries/s. A page written again after a crash adds nothing here (the entries exist).
- ``retries_total`` (counter): posts taken up again after a worker stopped mid-post (reclaimed
  from a crashed worker, or re-read from the worker's own pending list), resumed at the checkpoint.
- ``lag_seconds`` (histogram): post created (event time) -> its last follower written (or the
  skip decided), the freshness of home timelines.
- ``delivery_lag_seconds`` (histogram): post appended to the bus (its stream id's time) -> its last
  follower written: the fan-out's own delay without the producer's. Live, the two agree; for a
  replay or a backfill of old posts only this one means anything.
- ``posts_total{outcome}`` also counts ``deleted`` (a post deleted before its fan-out: nothing
  written) and ``post_deleted`` (a ``PostDeletedEvent`` applied).
- ``backlog_entries{topic,group}`` (gauge): posts not yet delivered to the group plus delivered and
  not acknowledged (``EventBus.backlog``: lag + pending).

Served with ``FanoutMetrics.serve(port, state=...)`` (``home-mixer fanout run --metrics-port``); the
endpoint is recorded as ``<state>/run/fanout_worker-<consumer>.json`` (service ``fanout_worker``),
which ``monitoring.prometheus_server`` scrapes as the ``fanout_worker`` job.
"""

from __future__ import annotations

import re

import prometheus_client as prom

from core.state import StateDir
from pipelines.streaming.metrics import record_metrics_endpoint

SERVICE = "fanout_worker"
# 10 ms .. 10 min: a small author's post reaches its followers in milliseconds; a backlog shows as minutes.
LAG_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)


class FanoutMetrics:
    """All metrics of one fan-out worker, registered in ``self.registry``."""

    def __init__(self, registry: prom.CollectorRegistry | None = None):
        self.registry = registry or prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.posts = prom.Counter("hm_fanout_posts_total", "Post events handled by outcome", ["outcome"], registry=r)
        self.deliveries = prom.Counter("hm_fanout_deliveries_total", "Home-timeline entries newly written",
                                       registry=r)
        self.retries = prom.Counter("hm_fanout_retries_total",
                                    "Posts resumed after a worker stopped mid-post (reclaimed or own pending)",
                                    registry=r)
        self.lag = prom.Histogram("hm_fanout_lag_seconds", "Post created to its last follower written",
                                  buckets=LAG_BUCKETS, registry=r)
        self.delivery_lag = prom.Histogram("hm_fanout_delivery_lag_seconds",
                                           "Post appended to the bus to its last follower written",
                                           buckets=LAG_BUCKETS, registry=r)
        self.backlog = prom.Gauge("hm_fanout_backlog_entries", "Posts not yet fanned out (undelivered + pending)",
                                  ["topic", "group"], registry=r)

    def render(self) -> bytes:
        """Prometheus text exposition of this registry."""
        return prom.generate_latest(self.registry)

    def serve(self, port: int, addr: str = "127.0.0.1", *, state: StateDir | None = None, consumer: str = "worker"):
        """Serve ``/metrics`` on ``addr:port`` (0 = any free port) in a daemon thread; returns
        ``(server, thread)``. With ``state``, the endpoint is recorded for Prometheus (module docstring).

        Raises:
            OSError: the port is taken.
        """
        server, thread = prom.start_http_server(port, addr=addr, registry=self.registry)
        if state is not None:
            record_metrics_endpoint(state, record_name(consumer), server.server_port, addr, service=SERVICE)
        return server, thread


def record_name(consumer: str) -> str:
    """``fanout_worker-<consumer>``, the consumer name reduced to file-name characters."""
    return f"{SERVICE}-{re.sub(r'[^A-Za-z0-9_.-]', '_', consumer)}"
