"""What the source runner reports about one call of a candidate source (the ``CandidateSource``
interface itself is in ``mixer.components``; re-exported here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mixer.candidate import Candidate
from mixer.components import CandidateSource  # the interface lives with the other component kinds


@dataclass
class SourceResult:
    """Outcome of one source call.

    Attributes:
        name: the source's name.
        status: "ok", "timeout" (no answer within timeout_ms), "error" (it raised) or "fallback"
            (it answered with last-known-good candidates, ``mixer.components.Fallback``: the
            request is degraded "candidate_sources").
        candidates: what it returned (empty for timeout and error).
        elapsed_ms: wall time until the answer or until the runner gave up.
        error: the exception text for "error", else "".
    """

    name: str
    status: Literal["ok", "timeout", "error", "fallback"]
    candidates: list[Candidate] = field(default_factory=list)
    elapsed_ms: float = 0.0
    error: str = ""


def source_limit(source: CandidateSource, query) -> int:
    """How many candidates ``source`` returns for ``query``: the query arm's limit for it
    (``experiment.arms[].sources.<name>.max_candidates``, set on ``Query.source_limits`` by
    ``ExperimentArmQueryHydrator``), else the source's own ``max_candidates``."""
    return int(query.source_limits.get(source.name, source.max_candidates))


__all__ = ["CandidateSource", "SourceResult", "source_limit"]
