"""Stage reporting for long jobs: one line when a stage starts and one with its time when it ends."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class StageTimer:
    """Prints ``[prefix] [i/n] name ...`` and ``name: done (detail) in X s``; keeps every stage's seconds.

    Args:
        total: number of stages expected (for the ``[i/n]`` counter); 0 hides the counter.
        prefix: a tag in front of every line (e.g. ``"features"``); empty hides it.
        log: receives each line (default: stderr, flushed).
    """

    total: int = 0
    prefix: str = ""
    log: Callable[[str], None] = _stderr
    times: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        """Time one stage; put a ``detail`` string into the yielded dict to print it at the end.

        The elapsed seconds are recorded even when the stage raises.
        """
        i = len(self.times) + 1
        head = f"[{self.prefix}] " if self.prefix else ""
        head += f"[{i}/{self.total}] " if self.total else ""
        info: dict = {}
        self.log(f"{head}{name} ...")
        t0 = time.perf_counter()
        try:
            yield info
        finally:
            self.times[name] = time.perf_counter() - t0
            detail = f" ({info['detail']})" if "detail" in info else ""
            self.log(f"{head}{name}: done{detail} in {self.times[name]:.1f} s")

    def summary(self) -> str:
        """A table of stage -> seconds, plus the total."""
        width = max((len(k) for k in self.times), default=5)
        lines = [f"{'stage':<{width}}  seconds", f"{'-' * width}  -------"]
        lines += [f"{k:<{width}}  {v:7.1f}" for k, v in self.times.items()]
        lines.append(f"{'total':<{width}}  {sum(self.times.values()):7.1f}")
        return "\n".join(lines)
