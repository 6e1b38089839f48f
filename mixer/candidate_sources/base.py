"""What a candidate source is, and what the runner reports about one call of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from mixer.candidate import Candidate, Query


class CandidateSource(Protocol):
    """A source of candidates. ``fetch`` may raise; the runner logs it and goes on without it.

    Attributes:
        name: short name, used as ``Candidate.source`` and as a metric label.
        timeout_ms: the runner stops waiting for this source after this many milliseconds.
    """

    name: str
    timeout_ms: float

    def fetch(self, query: Query) -> list[Candidate]:
        """Candidates for ``query`` (any order; the source's best first is customary)."""
        ...


@dataclass
class SourceResult:
    """Outcome of one source call.

    Attributes:
        name: the source's name.
        status: "ok", "timeout" (no answer within timeout_ms) or "error" (it raised).
        candidates: what it returned (empty unless ok).
        elapsed_ms: wall time until the answer or until the runner gave up.
        error: the exception text for "error", else "".
    """

    name: str
    status: Literal["ok", "timeout", "error"]
    candidates: list[Candidate] = field(default_factory=list)
    elapsed_ms: float = 0.0
    error: str = ""
