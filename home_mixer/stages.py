"""Stage reporting for long jobs: one line when a stage starts and one with its time when it ends."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class StageTimer:
    """Prints ``[i/n] name ...`` and ``done in X s``; keeps every stage's seconds for a summary.

    Args:
        total: number of stages expected (for the ``[i/n]`` counter); 0 hides the counter.
    """

    total: int = 0
    stream: object = sys.stderr
    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        """Time one stage; the elapsed seconds are recorded even when it raises."""
        i = len(self.times) + 1
        prefix = f"[{i}/{self.total}] " if self.total else ""
        print(f"{prefix}{name} ...", file=self.stream, flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.times[name] = time.perf_counter() - t0
            print(f"{prefix}{name}: done in {self.times[name]:.1f} s", file=self.stream, flush=True)

    def summary(self) -> str:
        """A table of stage -> seconds, plus the total."""
        width = max((len(k) for k in self.times), default=5)
        lines = [f"{'stage':<{width}}  seconds", f"{'-' * width}  -------"]
        lines += [f"{k:<{width}}  {v:7.1f}" for k, v in self.times.items()]
        lines.append(f"{'total':<{width}}  {sum(self.times.values()):7.1f}")
        return "\n".join(lines)
