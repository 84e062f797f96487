"""Privacy units over a prepared directory: what DP-SGD samples, clips and protects as one.

- `WindowUnits`: every training window (`seq_len + 1` tokens of the stream) is a unit, as
  `TokenWindows` cuts them; windows may straddle documents.
- `DocumentUnits`: every document is a unit. Documents are the stretches of the stream that end
  with the tokenizer's eos (prepare-data appends one after each document); each is cut into
  windows of its own (the last one padded, its padding masked out of the loss), so no window holds
  two documents and no unit's tokens reach another's through attention. A document longer than
  `max_windows` windows is truncated: a unit's contribution must be bounded, and its remaining
  tokens are not trained on (the count is reported).
- `UserUnits`: every user is a unit, made of all their documents (prepare-data --user-field
  records each document's user). Each document is cut into windows of its own exactly as under
  `DocumentUnits`; a user's windows, in stream order, are capped at `max_windows` in all, so
  one person's contribution stays bounded however much they wrote (the rest is counted as
  dropped, as for documents).

All answer `len()` (the number of units, which Poisson sampling draws from) and `batch(units)`:
(tokens `[W, seq_len + 1]`, loss mask `[W, seq_len]` or None, each window's unit `[W]` numbered
0..len(units)-1 in the order given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# one list of privacy.unit values: the config validation uses it too
from flexmoe.config.train import PRIVACY_UNITS as UNITS
from flexmoe.data.dataset import TokenWindows
from flexmoe.data.errors import DataError
from flexmoe.data.manifest import load_user_ids


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
        self.num_stretches = len(ends_arr)  # every eos-terminated stretch, lone eos included
        self.stretch = np.flatnonzero(keep)  # each unit's stretch: its document's number in the stream
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

    def num_windows(self) -> np.ndarray:
        """How many windows `_windows_of` gives each document (capped at max_windows)."""
        return np.minimum(-(-(self.lengths - 1) // self.seq_len), self.max_windows)

    def batch(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every window of the documents `units`, padded; the mask keeps real targets only."""
        return self.fill([(j, s, n) for j, d in enumerate(units) for s, n in self._windows_of(int(d))])

    def fill(self, spans: list[tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unit, start, length) spans as padded windows: tokens, loss mask, each window's unit."""
        S1 = self.seq_len + 1
        tokens = np.full((len(spans), S1), self.pad, dtype=np.int64)
        mask = np.zeros((len(spans), S1 - 1), dtype=np.float32)
        unit = np.empty(len(spans), dtype=np.int64)
        for row, (j, s, n) in enumerate(spans):
            tokens[row, :n] = self.windows.tokens(s, s + n)
            mask[row, :n - 1] = 1.0
            unit[row] = j
        return tokens, mask, unit


class UserUnits:
    """Each user is a unit: their documents' windows (as `DocumentUnits` cuts them), at most
    `max_windows` in all."""

    kind = "user"

    def __init__(self, windows: TokenWindows, *, max_windows: int, pad_id: int | None = None,
                 eos_id: int | None = None, verify: bool = True):
        ids = load_user_ids(windows.data_dir, windows.manifest, verify=verify)
        if ids is None:
            raise DataError(no_user_ids(windows.data_dir))
        # the same documents, windows, padding and eos as privacy.unit=document
        docs = self.docs = DocumentUnits(windows, max_windows=max_windows, pad_id=pad_id, eos_id=eos_id)
        # user ids belong to documents by position: the k-th eos-terminated stretch is the k-th
        # document prepare-data wrote. Checked, not assumed: a mismatch would give one user's
        # tokens to another's unit, and the guarantee would silently be about the wrong people.
        if docs.num_stretches != len(ids):
            raise DataError(f"{windows.data_dir}: {docs.num_stretches} eos-terminated documents in the shards but "
                            f"{len(ids)} user ids; the directory was altered since prepare-data: re-run it")
        self.windows, self.seq_len, self.max_windows = windows, docs.seq_len, docs.max_windows
        self.num_users = int(windows.manifest["users"]["num_users"])
        user = ids[docs.stretch]  # each trainable document's user
        order = np.argsort(user, kind="stable")  # by user, each user's documents in stream order
        counts = np.bincount(user, minlength=self.num_users)
        ptr = np.concatenate([[0], np.cumsum(counts)])
        nw = docs.num_windows()[order]
        present = counts > 0  # a user whose every document is empty has nothing to train: no unit
        excl = np.cumsum(nw) - nw  # windows before each document, all users together
        before = excl - np.repeat(excl[ptr[:-1][present]], counts[present])  # ... of its own user
        keep = np.clip(self.max_windows - before, 0, nw)  # each document's windows within its user's cap
        self.user_of_unit = np.flatnonzero(present)
        self._docs, self._keep = order, keep  # unit u: self._docs[_ptr[u]:_ptr[u + 1]], in stream order
        self._ptr = np.concatenate([ptr[:-1][present], [ptr[-1]]])
        # trained targets: k windows of a document cover min(its targets, k * seq_len)
        self.tokens_kept = int(np.minimum(docs.lengths[order] - 1, keep * self.seq_len).sum())
        self.tokens_dropped = int(docs.lengths.sum() - len(docs.lengths)) - self.tokens_kept

    def __len__(self) -> int:
        return len(self.user_of_unit)

    def describe(self) -> str:
        return (f"user (all of a user's documents, each in windows of its own of {self.seq_len + 1} tokens, at most "
                f"{self.max_windows} windows per user; the rest truncated)")

    def windows_of(self, u: int) -> list[tuple[int, int]]:
        """(start, length) of unit u's windows: its documents' windows in stream order, capped."""
        out = []
        for i in range(self._ptr[u], self._ptr[u + 1]):
            if self._keep[i] == 0:  # the cap is reached: every later document of this user is dropped
                break
            out += self.docs._windows_of(int(self._docs[i]))[:int(self._keep[i])]
        return out

    def batch(self, units: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every window of the users `units`, padded as under `DocumentUnits`; window j's unit is
        the position of its user in `units`."""
        return self.docs.fill([(j, s, n) for j, u in enumerate(units) for s, n in self.windows_of(int(u))])


def no_user_ids(data_dir: str | Path) -> str:
    """The refusal of privacy.unit=user on data prepared without user ids."""
    return (f"{data_dir}: prepared without user ids, so privacy.unit=user has no users; re-run prepare-data with "
            "--user-field NAME (the jsonl field holding each record's user id), or use privacy.unit=document")


def open_units(kind: str, data_dir: str | Path, seq_len: int, *, verify: bool = True, max_windows: int = 8,
               pad_id: int | None = None, eos_id: int | None = None):
    """`WindowUnits`, `DocumentUnits` or `UserUnits` of a prepared directory."""
    if kind not in UNITS:
        raise DataError(f"privacy.unit={kind!r} is not {'|'.join(UNITS)}")
    windows = TokenWindows(data_dir, seq_len, verify=verify)
    if kind == "window":
        return WindowUnits(windows)
    if kind == "user":
        return UserUnits(windows, max_windows=max_windows, pad_id=pad_id, eos_id=eos_id, verify=verify)
    return DocumentUnits(windows, max_windows=max_windows, pad_id=pad_id, eos_id=eos_id)
