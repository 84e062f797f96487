"""Messages for people: one `logging` tree under `flexmoe`, printed on stderr by rank 0 only.

`print` is kept for a command's actual output (what a script would capture from stdout); every
progress note, warning and stage line goes through `get_logger(__name__)`. Under torchrun every
rank runs the same code, so records from ranks other than 0 are dropped unless a call passes
`extra={"all_ranks": True}` (a rank's own failure, for instance).
"""

from __future__ import annotations

import logging
import os
import sys

_ROOT = "flexmoe"


def process_rank() -> int:
    """This process's global rank: torch.distributed's when it is up, else $RANK, else 0."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class RankZeroFilter(logging.Filter):
    """Let a record through on rank 0, or on every rank when it asks to (`all_ranks`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or process_rank() == 0


class _Formatter(logging.Formatter):
    """`[flexmoe] message`, `[flexmoe] warning: message`; `bare` records as they are."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if getattr(record, "bare", False):
            return msg
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"[flexmoe] {level}{msg}"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (test capture and redirects see it)."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def setup_logging(level: int | str | None = None) -> logging.Logger:
    """Attach the stderr handler and the rank filter to the `flexmoe` logger (once).

    The level comes from `level`, else $FLEXMOE_LOG_LEVEL, else INFO."""
    root = logging.getLogger(_ROOT)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_Formatter())
        handler.addFilter(RankZeroFilter())
        root.addHandler(handler)
        root.propagate = False
    root.setLevel(level or os.environ.get("FLEXMOE_LOG_LEVEL", "INFO").upper())
    return root


def get_logger(name: str) -> logging.Logger:
    """The logger for module `name` (pass `__name__`), with the flexmoe handler set up."""
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        setup_logging()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
