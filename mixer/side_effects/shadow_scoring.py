"""Shadow scoring: a challenger heavy ranker scores what the served one scored, off the request path.

For a sampled share of requests (``experiment.shadow.share``, by a hash of the request id: the
same request is always in or out), the side effect hands the request's heavy-ranked candidates and
their feature rows to one background thread and returns. The thread scores them with the
challenger, blends its heads with the request arm's weights (the blender that served the request),
and appends the served and the challenger's scores and ranks to ``core.online_layout.SHADOW_LOG``.
What is served never changes: the challenger writes only to that stream, and candidates are copied
before its scores are set.

The hand-off is bounded (``queue_size`` requests waiting or in flight): when the thread falls
behind, the request is not shadowed and ``hm_mixer_shadow_requests_total{outcome="dropped"}``
counts it, so a slow challenger cannot grow memory or delay requests. The request path pays one
hash, the sampling test and a queue put (``bench/shadow.py`` measures the added p99); the thread
shares the process's cores (and, between native calls, its GIL) with the requests, which the
bench's p99 includes.

Shadow deployment is Sculley et al.'s "dark launch" of a model before it takes traffic (Hidden
Technical Debt in Machine Learning Systems, NeurIPS 2015): the step before a challenger gets a
small arm of its own (``experiment.arms[].models``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import redis

from core import online_layout as keys
from mixer.candidate import Query
from mixer.components import SideEffect, TimelineResult
from mixer.scorers.ranker_handle import predict_matrix

log = logging.getLogger(__name__)


def request_sampled(request_id: str, share: float) -> bool:
    """True for a ``share`` of request ids, the same answer for the same id (sha256 of the id,
    first 8 bytes, as a position in [0, 1))."""
    digest = hashlib.sha256(request_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


class ShadowRunner:
    """The background thread of shadow scoring, shared by every pipeline declaration of one mixer
    process (a model swap declares the pipeline again; the thread and its bound stay).

    Args:
        queue_size: requests waiting or being scored at most; more are dropped.
        on_outcome: called with "scored", "dropped" or "failed" per sampled request (metrics).

    Raises:
        ValueError: ``queue_size < 1``.
    """

    def __init__(self, queue_size: int, on_outcome: Callable[[str], None] = lambda outcome: None):
        if int(queue_size) < 1:
            raise ValueError(f"experiment.shadow.queue_size must be >= 1, got {queue_size}")
        self._slots = threading.BoundedSemaphore(int(queue_size))
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hm-shadow")
        self.on_outcome = on_outcome

    def submit(self, task: Callable[[], None]) -> bool:
        """Run ``task`` on the thread if a slot is free (True), else drop it (False, counted)."""
        if not self._slots.acquire(blocking=False):
            self.on_outcome("dropped")
            return False

        def run():
            try:
                task()
                self.on_outcome("scored")
            except Exception as e:  # noqa: BLE001 - the challenger must never take serving down
                log.warning("shadow scoring failed: %r", e)
                self.on_outcome("failed")
            finally:
                self._slots.release()

        try:
            self._executor.submit(run)
        except RuntimeError:  # shut down: the mixer is stopping
            self._slots.release()
            return False
        return True

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until nothing is queued or running (tests, shutdown); True if it emptied in time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = threading.Event()
            try:
                self._executor.submit(done.set)
            except RuntimeError:
                return True
            if done.wait(max(deadline - time.monotonic(), 0.0)):
                return True
        return False

    def close(self) -> None:
        """Finish what is queued, then stop the thread."""
        self._executor.shutdown(wait=True)


class ShadowScoringSideEffect(SideEffect):
    """Hands a sampled request's heavy-ranked candidates to the challenger (module docstring).

    Entry fields of ``SHADOW_LOG`` (strings): request_id, user_id, arm, surface, as_of (request
    clock, epoch s), served_at (wall clock, epoch s), served_version and challenger_version (heavy
    ranker), scored_ms (the challenger's scoring + blending time), and ``posts``: JSON list in the
    served model's order of ``[post_id, served_score, challenger_score, challenger_rank,
    page_position]``: both scores are the blender's (the request arm's weights) before the
    selectors (author diversity, exploration) reorder the page, ranks are 0-based over the
    heavy-ranked posts, page_position is the post's place on the served page (-1: not on it).

    Args:
        challenger: the challenger heavy ranker (a ``HeavyRankerScorer``); None disables shadowing.
        blender: the pipeline's ``WeightedSumBlender`` (the request arm's weights).
        runner: the process's ``ShadowRunner``.
        client: the online store.
        share: the share of requests scored, in (0, 1].
        maxlen: approximate cap of the stream (entries).

    Raises:
        ValueError: the challenger predicts other heads than the blender weighs.
    """

    name = "shadow_scoring"

    def __init__(self, challenger, blender, runner: ShadowRunner | None, client: redis.Redis, share: float,
                 maxlen: int, *, stream: str = keys.SHADOW_LOG, wall_clock: Callable[[], float] = time.time):
        self.challenger = challenger
        self.blender = blender
        self.runner = runner
        self.client = client
        self.share = float(share)
        self.maxlen = int(maxlen)
        self.stream = stream
        self.wall_clock = wall_clock
        if challenger is not None:
            weighted = {h for w in blender.arm_weights.values() for h in w}
            missing = sorted(weighted - set(challenger.heads))
            if missing:
                raise ValueError(f"the shadow heavy ranker (version {challenger.version}) does not predict heads "
                                 f"{missing} that the arms weigh")

    def enabled(self, query: Query) -> bool:
        """True for the sampled share of requests when a challenger is loaded."""
        return self.challenger is not None and self.runner is not None and request_sampled(query.request_id,
                                                                                           self.share)

    def apply(self, result: TimelineResult) -> None:
        """Queue the challenger's scoring of ``result.ranked`` (nothing is scored here).

        The feature frame is handed over by reference: the request is finished and nothing
        writes to it any more.
        """
        if not result.ranked or result.features is None:
            return
        ranked, features, query = list(result.ranked), result.features, result.query
        page = {id(c): i for i, c in enumerate(result.items)}
        positions = [page.get(id(c), -1) for c in ranked]
        served_version = result.model_versions.get("heavy_ranker", "")
        self.runner.submit(lambda: self._score(query, ranked, features, positions, served_version))

    def _score(self, query: Query, ranked: list, features, positions: list[int], served_version: str) -> None:
        """On the shadow thread: score, blend, rank, append one entry."""
        start = time.perf_counter()
        probs, _ = predict_matrix(self.challenger.handle, features, "shadow heavy ranker")
        heads = list(self.challenger.heads)
        shadow = [dataclasses.replace(c, heads=dict(zip(heads, row)), team_scores={})
                  for c, row in zip(ranked, probs.tolist())]
        self.blender.blend(query, shadow)
        # the served heads blended again: the selectors after the blender (author diversity) have
        # changed the served candidates' scores, and the two models are compared before them
        again = [dataclasses.replace(c, team_scores={}) for c in ranked]
        self.blender.blend(query, again)
        served = np.array([c.score for c in again], dtype=np.float64)
        challenger = np.array([c.score for c in shadow], dtype=np.float64)
        served_order = np.argsort(-served, kind="stable")
        challenger_rank = np.empty(len(shadow), dtype=np.int64)
        challenger_rank[np.argsort(-challenger, kind="stable")] = np.arange(len(shadow))
        posts = [[int(ranked[i].post_id), _finite(served[i]), _finite(challenger[i]), int(challenger_rank[i]),
                  int(positions[i])] for i in served_order.tolist()]
        scored_ms = (time.perf_counter() - start) * 1000.0
        self.client.xadd(self.stream, {
            "request_id": query.request_id, "user_id": query.user_id, "arm": query.arm or "",
            "surface": query.surface, "as_of": f"{query.now_s:.6f}", "served_at": f"{self.wall_clock():.3f}",
            "served_version": served_version, "challenger_version": str(self.challenger.version),
            "scored_ms": f"{scored_ms:.3f}", "posts": json.dumps(posts, separators=(",", ":")),
        }, maxlen=self.maxlen, approximate=True)


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None
