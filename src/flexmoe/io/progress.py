"""Progress of long conversions on stderr: bytes done / total, rate and ETA.

On a terminal it is a tqdm bar redrawn in place; in a log (not a terminal) it is plain lines: one
per shard written, and one every `log_every` seconds while no shard line came. `set_quiet(True)`
(the commands' `--quiet`, or FLEXMOE_QUIET=1) silences it. Nothing is printed before the first
update, so a conversion refused during its checks leaves only its one-line error on stderr.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable, Iterator, TextIO

_QUIET = False


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar and line of this process."""
    global _QUIET
    _QUIET = bool(quiet)


@contextlib.contextmanager
def output_settings() -> Iterator[None]:
    """Restore the quiet flag and the `flexmoe` logger's level on exit (a command's --quiet sets both)."""
    import logging

    quiet, level = _QUIET, logging.getLogger("flexmoe").level
    try:
        yield
    finally:
        set_quiet(quiet)
        logging.getLogger("flexmoe").setLevel(level)


def is_quiet() -> bool:
    return _QUIET or os.environ.get("FLEXMOE_QUIET", "") not in ("", "0")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def format_seconds(s: float) -> str:
    """12s, 3m04s, 2h05m: an ETA or elapsed time a person reads at a glance."""
    s = max(int(round(s)), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """A byte counter shown as a tqdm bar on a terminal and as lines in a log."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, log_every: float = 10.0, quiet: bool | None = None,
                 unit: str = "B"):
        # `unit`: "B" counts bytes (shown as MB/GB); any other name counts items (windows, steps)
        self.label, self.total, self.done_bytes, self.unit = label, max(total, 1), 0, unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.quiet = is_quiet() if quiet is None else quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = log_every
        self.start = self.last = clock()
        self._bar = None

    def _tqdm(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=f"[flexmoe] {self.label}", unit=self.unit,
                             unit_scale=self.unit == "B", unit_divisor=1000, file=self.stream, dynamic_ncols=True, leave=False, mininterval=0.2)
        return self._bar

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done_bytes / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done_bytes) / rate if rate > 0 else float("inf")
        eta_s = format_seconds(eta) if eta != float("inf") else "?"
        if self.unit != "B":
            return (f"[flexmoe] {self.label}: {self.done_bytes:,} / {self.total:,} {self.unit} "
                    f"({100 * self.done_bytes / self.total:.0f}%), {rate:,.1f} {self.unit}/s, ETA {eta_s}")
        return (f"[flexmoe] {self.label}: {human_bytes(self.done_bytes)} / {human_bytes(self.total)} "
                f"({100 * self.done_bytes / self.total:.0f}%), {human_bytes(rate)}/s, ETA {eta_s}")

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def advance(self, n: int) -> None:
        self.done_bytes += n
        if self.quiet:
            return
        if self.tty:
            self._tqdm().update(n)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self.line(now))

    def shard_done(self, name: str, index: int, count: int) -> None:
        """A shard is complete: one line in a log (the bar shows it on a terminal)."""
        if self.quiet:
            return
        if self.tty:
            self._tqdm().set_postfix_str(f"shard {index}/{count}", refresh=False)
            return
        now = self.last = self.clock()
        self._write(f"{self.line(now)} [shard {index}/{count} {name}]")

    def finish(self, what: str | None) -> None:
        """Final line: what was written, how much, how fast (None: only close the bar)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.quiet or what is None:
            return
        elapsed = max(self.clock() - self.start, 1e-9)
        if self.unit != "B":
            self._write(f"[flexmoe] {self.label}: {what}, {self.done_bytes:,} {self.unit} in {elapsed:.1f}s")
            return
        self._write(f"[flexmoe] {self.label}: {what}, {human_bytes(self.done_bytes)} in {elapsed:.1f}s "
                    f"({human_bytes(self.done_bytes / elapsed)}/s)")
