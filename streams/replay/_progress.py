"""Progress of a replay: events, events/s and ETA on one line, and the numbers for the summary."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass(slots=True)
class Progress:
    label: str
    total: int
    done: int = 0  # records read
    applied: int = 0  # records the target applied (a --tenant replay skips the others)
    rejected: int = 0
    started: float = field(default_factory=time.monotonic)
    out: TextIO | None = None
    _last_print: float = 0.0

    @property
    def elapsed_s(self) -> float:
        return max(time.monotonic() - self.started, 1e-9)

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s

    def line(self) -> str:
        rate = self.rate
        share = f" ({100 * self.done / self.total:5.1f}%)" if self.total else ""
        left = max(self.total - self.done, 0)
        eta = f" ETA {left / rate:6.1f}s" if rate > 0 and self.total else ""
        return f"{self.label}: {self.done:,}/{self.total:,} events{share} {rate:,.0f} ev/s{eta}"

    def advance(self, events: int, rejected: int = 0) -> None:
        self.done += events
        self.rejected += rejected
        if self.out is None:
            return
        now = time.monotonic()
        interactive = self.out.isatty()
        if now - self._last_print >= (0.25 if interactive else 5.0):
            self._last_print = now
            if interactive:
                self.out.write("\r" + self.line().ljust(100))
            else:
                self.out.write(self.line() + "\n")
            self.out.flush()

    def finish(self) -> None:
        if self.out is not None:
            self.out.write(("\r" if self.out.isatty() else "") + self.line().ljust(100) + "\n")
            self.out.flush()


def stderr() -> TextIO:
    return sys.stderr
