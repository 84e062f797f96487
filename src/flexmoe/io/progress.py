"""One progress line on stderr for long conversions: bytes done / total, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


class Progress:
    """On a terminal the line is redrawn in place; in a log a line is written every `log_every` s.

    Nothing is printed before the first update, so a conversion refused during its checks
    leaves only its one-line error on stderr.
    """

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, log_every: float = 10.0):
        self.label, self.total, self.done_bytes = label, max(total, 1), 0
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else log_every
        self.start = self.last = clock()

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done_bytes) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        return (f"[flexmoe] {self.label}: {human_bytes(self.done_bytes)} / {human_bytes(self.total)} "
                f"({100 * self.done_bytes / self.total:.0f}%), {human_bytes(rate)}/s, ETA {eta_s}")

    def advance(self, n: int) -> None:
        self.done_bytes += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            # On a terminal, pad so a shorter line fully covers the previous one.
            self.stream.write(("\r" + self.line(now).ljust(100)) if self.tty else self.line(now) + "\n")
            self.stream.flush()

    def finish(self, what: str) -> None:
        """Final line: what was written, how much, how fast."""
        elapsed = max(self.clock() - self.start, 1e-9)
        prefix = "\r" if self.tty else ""
        text = (f"[flexmoe] {self.label}: {what}, {human_bytes(self.done_bytes)} in {elapsed:.1f}s "
                f"({human_bytes(self.done_bytes / elapsed)}/s)")
        self.stream.write(prefix + (text.ljust(100) if self.tty else text) + "\n")
        self.stream.flush()
