"""Latency-driven quality factor: when the mixer runs slow, do less work per request.

Twitter's product-mixer sheds load with a quality factor in (0, 1] per component
(``LinearLatencyQualityFactor``, product-mixer ``core/quality_factor``): each observed latency
above the target lowers the factor by a fixed step, each one below raises it, within
``[min_factor, 1]``. Here the observation is the p95 of the last ``window`` requests of this
worker process (from arrival to answer, queue wait included: ``mixer.admission`` times them),
taken every ``update_every`` requests, and the factor scales the request's work:
``heavy_ranker_top_k`` and every candidate source's limit (``scaled``). A falling p95 restores
them step by step, so the mixer never oscillates between all and nothing.
"""

from __future__ import annotations

import math
import threading
from collections import deque

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class QualityFactorSettings(BaseModel):
    """The ``quality_factor`` section of the mixer config.

    Attributes:
        enabled: adjust the factor (False: always 1).
        target_p95_ms: the p95 request latency to hold (ms).
        step: change of the factor per update (linear steps, as product-mixer's).
        min_factor: the factor never goes below this (the work kept under overload).
        window: requests the p95 is taken over.
        update_every: requests between updates (each update looks at a mostly new window).
    """

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    target_p95_ms: float = Field(80.0, gt=0)
    step: float = Field(0.1, gt=0, le=1)
    min_factor: float = Field(0.2, gt=0, le=1)
    window: int = Field(100, ge=10)
    update_every: int = Field(20, ge=1)


class LinearLatencyQualityFactor:
    """The factor of one worker process; thread-safe (requests run on a thread pool).

    Args:
        settings: ``QualityFactorSettings``.
    """

    def __init__(self, settings: QualityFactorSettings):
        self.settings = settings
        self._latencies_ms: deque[float] = deque(maxlen=settings.window)
        self._since_update = 0
        self._factor = 1.0
        self._p95_ms = float("nan")
        self._lock = threading.Lock()

    @property
    def factor(self) -> float:
        """The current factor in ``[min_factor, 1]``."""
        return self._factor

    @property
    def p95_ms(self) -> float:
        """The p95 (ms) the last update saw (NaN before the first)."""
        return self._p95_ms

    def observe(self, latency_ms: float) -> float:
        """Record one request's latency (ms); every ``update_every`` requests, move the factor one
        step down if the window's p95 is above the target, else one step up. Returns the factor."""
        s = self.settings
        if not s.enabled:
            return 1.0
        with self._lock:
            self._latencies_ms.append(float(latency_ms))
            self._since_update += 1
            if self._since_update >= s.update_every and len(self._latencies_ms) >= min(s.window, s.update_every):
                self._since_update = 0
                self._p95_ms = float(np.percentile(np.fromiter(self._latencies_ms, float), 95))
                delta = -s.step if self._p95_ms > s.target_p95_ms else s.step
                self._factor = min(1.0, max(s.min_factor, round(self._factor + delta, 6)))
            return self._factor


def scaled(limit: int, factor: float) -> int:
    """``limit`` x ``factor``, rounded up, at least 1 (a source or the heavy ranker never gets 0)."""
    return max(1, math.ceil(round(limit * factor, 9)))  # 1000 x 0.33 is 330.00000000000006 in floats
