"""Privacy units over a prepared directory: what DP-SGD samples, clips and protects as one.

- `WindowUnits`: every training window (`seq_len + 1` tokens of the stream) is a unit, as
  `TokenWindows` cuts them; windows may straddle documents.
- `DocumentUnits`: every document is a unit. Documents are the stretches of the stream that end
  with the tokenizer's eos (prepare-data appends one after each document); each is cut into
  windows of its own (the last one padded, its padding masked out of the loss), so no window holds
  two documents and no unit's tokens reach another's through attention. A document longer than
  `max_windows` windows is truncated: a unit's contribution must be bounded, and its remaining
  tokens are not trained on (the count is reported).

Both answer `len()` (the number of units, which Poisson sampling draws from) and `batch(units)`:
(tokens `[W, seq_len + 1]`, loss mask `[W, seq_len]` or None, each window's unit `[W]` numbered
0..len(units)-1 in the order given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flexmoe.data.dataset import TokenWindows
from flexmoe.data.errors import DataError

UNITS = ("window", "document")


class WindowUnits:
    """Each training window is its own unit."""

    kind = "window"

    def __init__(self, windows: TokenWindows):
        self.windows, self.seq_len = windows, windows.seq_len
        self.tokens_kept, self.tokens_dropped = len(windows) * windows.seq_len, 0

    def __len__(self) -> int:
        return len(self.windows)

    def describe(self) -> str:
        return f"window of {self.seq_len + 1} tokens"

    def batch(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The windows `units`, no mask (every target trains), window j is unit j."""
        return self.windows.windows(units), None, np.arange(len(units), dtype=np.int64)


class DocumentUnits:
    """Each document is a unit of at most `max_windows` windows of its own."""

    kind = "document"

    def __init__(self, windows: TokenWindows, *, max_windows: int, pad_id: int | None = None,
                 eos_id: int | None = None):
        m = windows.manifest
        # the eos prepare-data appended: recorded in the manifest (since 2026-11), else the
        # tokenizer's, else the model's (`eos_id`)
        eos = next((e for e in (m.get("eos_id"), (m.get("tokenizer") or {}).get("eos_id"), eos_id) if e is not None),
                   None)
        if not m.get("append_eos", False) or eos is None:
            raise DataError(f"{windows.data_dir}: prepared without an eos after each document, so it has no document "
                            "boundaries; re-run prepare-data with a tokenizer that has an eos, or use privacy.unit=window")
        if max_windows < 1:
            raise DataError(f"privacy.max_unit_windows={max_windows} must be >= 1")
        self.windows, self.seq_len, self.max_windows = windows, windows.seq_len, int(max_windows)
        self.eos = int(eos)
        self.pad = int(pad_id) if pad_id is not None else self.eos  # masked out of the loss either way
        ends, base = [], 0
        for _, arr in windows.shard_arrays():  # one shard at a time: memmapped
            ends.append(np.flatnonzero(np.asarray(arr) == self.eos) + base)
            base += len(arr)
        ends_arr = np.concatenate(ends) if ends else np.zeros(0, dtype=np.int64)
        starts = np.concatenate([[0], ends_arr[:-1] + 1]) if len(ends_arr) else np.zeros(0, dtype=np.int64)
        lengths = ends_arr + 1 - starts  # each document with its eos
        keep = lengths >= 2  # a lone eos has no target to train
        self.starts, self.lengths = starts[keep].astype(np.int64), lengths[keep].astype(np.int64)
        if len(self.starts) == 0:
            raise DataError(f"{windows.data_dir}: no document of at least 2 tokens; use privacy.unit=window")
        cap = self.max_windows * self.seq_len + 1
        self.tokens_kept = int(np.minimum(self.lengths, cap).sum() - len(self.lengths))  # trained targets
        self.tokens_dropped = int(self.lengths.sum() - len(self.lengths)) - self.tokens_kept

    def __len__(self) -> int:
        return len(self.starts)

    def describe(self) -> str:
        return f"document (at most {self.max_windows} windows of {self.seq_len + 1} tokens; longer ones truncated)"

    def _windows_of(self, d: int) -> list[tuple[int, int]]:
        """(start, length) of document d's windows: consecutive windows share one token, as in TokenWindows."""
        start, n = int(self.starts[d]), int(self.lengths[d])
        out, at = [], 0
        while at + 1 < n and len(out) < self.max_windows:
            take = min(self.seq_len + 1, n - at)
            out.append((start + at, take))
            at += self.seq_len
        return out

    def batch(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every window of the documents `units`, padded; the mask keeps real targets only."""
        spans = [(j, s, n) for j, d in enumerate(units) for s, n in self._windows_of(int(d))]
        S1 = self.seq_len + 1
        tokens = np.full((len(spans), S1), self.pad, dtype=np.int64)
        mask = np.zeros((len(spans), S1 - 1), dtype=np.float32)
        unit = np.empty(len(spans), dtype=np.int64)
        for row, (j, s, n) in enumerate(spans):
            tokens[row, :n] = self.windows.tokens(s, s + n)
            mask[row, :n - 1] = 1.0
            unit[row] = j
        return tokens, mask, unit


def open_units(kind: str, data_dir: str | Path, seq_len: int, *, verify: bool = True, max_windows: int = 8,
               pad_id: int | None = None, eos_id: int | None = None):
    """`WindowUnits` or `DocumentUnits` of a prepared directory."""
    if kind not in UNITS:
        raise DataError(f"privacy.unit={kind!r} is not {'|'.join(UNITS)}")
    windows = TokenWindows(data_dir, seq_len, verify=verify)
    if kind == "window":
        return WindowUnits(windows)
    return DocumentUnits(windows, max_windows=max_windows, pad_id=pad_id, eos_id=eos_id)
