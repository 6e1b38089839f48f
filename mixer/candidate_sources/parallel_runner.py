"""Runs candidate sources in parallel, each under its own timeout, fail-open."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from mixer.candidate import Candidate, Query
from mixer.candidate_sources.base import CandidateSource, SourceResult
from mixer.components import Fallback
from mixer.quality_factor import scaled
from mixer.candidate_sources.base import source_limit

log = logging.getLogger(__name__)


class ParallelSourceRunner:
    """Submits every source to a thread pool and waits for each until its own deadline.

    A source that raises or misses its deadline is logged and reported (status "error" /
    "timeout") and contributes nothing: the timeline is served from the other sources (fail-open,
    as Twitter's product-mixer does for non-critical candidate pipelines). Python threads cannot be
    killed, so a timed-out call keeps its worker until it returns; Redis socket timeouts bound that.

    Args:
        sources: the sources, in priority order (earlier sources win duplicates downstream).
        executor: a shared pool (owned by the caller, who shuts it down); size it to at least
            ``len(sources)`` times the expected concurrent requests.
    """

    name = "candidate_sources"

    def __init__(self, sources: list[CandidateSource], executor: ThreadPoolExecutor):
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate source names must be unique, got {names}")
        self.sources = list(sources)
        self._by_name = {s.name: s for s in sources}
        self.executor = executor

    def run(self, query: Query) -> tuple[list[Candidate], list[SourceResult]]:
        """Call every source enabled for ``query`` (``source.enabled(query)``, and not switched off
        for the query's arm: ``Query.disabled_sources``); return all
        candidates (in source order) and one result per source called (a disabled source is not
        called and has no result)."""
        start = time.perf_counter()
        sources = [s for s in self.sources if s.enabled(query) and s.name not in query.disabled_sources]
        futures: list[Future] = [self.executor.submit(s.fetch, query) for s in sources]
        results: list[SourceResult] = []
        for source, fut in zip(sources, futures):
            remaining = source.timeout_ms / 1000.0 - (time.perf_counter() - start)
            try:
                cands = fut.result(timeout=max(remaining, 0.0))
                results.append(SourceResult(source.name, "ok", list(cands), (time.perf_counter() - start) * 1000))
            except Fallback as f:  # a cached source answered from its last-known-good lists
                results.append(SourceResult(source.name, "fallback", list(f.value),
                                            (time.perf_counter() - start) * 1000, f.reason))
            except FutureTimeout:
                fut.cancel()
                log.warning("candidate source %s timed out after %.0f ms (user %s); skipped",
                            source.name, source.timeout_ms, query.user_id)
                results.append(SourceResult(source.name, "timeout", [], (time.perf_counter() - start) * 1000))
            except Exception as e:  # noqa: BLE001 - fail-open: any source error is skipped
                log.warning("candidate source %s failed (user %s): %r; skipped", source.name, query.user_id, e)
                results.append(SourceResult(source.name, "error", [], (time.perf_counter() - start) * 1000, repr(e)))
        if query.quality_factor < 1.0:  # under load: each source keeps its best share (lists are best first)
            for r in results:
                source = self._by_name[r.name]
                limit = source_limit(source, query) if hasattr(source, "max_candidates") else None
                if limit is not None:
                    del r.candidates[scaled(limit, query.quality_factor):]
        candidates = [c for r in results for c in r.candidates]
        return candidates, results
