"""Taps: what else the bytes a writer writes (io.writer) are fed to, as they pass.

Per-expert hashes (ExpertHashTap), value checks (FiniteTap), and each file's parts entry
(PartsTap, io.digests). A tap's work goes into `jobs`, which the writer runs in parallel with the
write (hashlib and numpy release the GIL).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from flexmoe.io.digests import parts_record
from flexmoe.io.dtypes import nonfinite, st_name, text
from flexmoe.io.errors import CheckpointError
from flexmoe.io.fingerprint import TENSOR_SHA256_FORMAT, compose, slot_line
from flexmoe.io.sources import Skipped, Source, Stacked, nbytes
from flexmoe.io.stream import LazyTensor


class Tap:
    """Sees every output tensor's bytes as they are written: begin, pieces at byte offsets, end.

    `update` appends its work to `jobs` (callables; hashlib and numpy release the GIL), which the
    writer runs in parallel with the write and waits for before the next piece is read."""

    def begin(self, name: str, src: Source) -> None: ...

    def wants(self, name: str) -> bool:
        """Whether it needs the bytes of the tensor just begun (asked after `begin`): when no tap does,
        the writer copies them in the kernel (copy_file_range) and calls no `update`."""
        return True

    def update(self, name: str, offset: int, data: memoryview, jobs: list) -> None: ...

    def end(self, name: str) -> None: ...


class SlotTap(Tap):
    """Base for taps that work per slot (dim-0 slice) of some tensors: `slot(name, j, offset, data)`."""

    def __init__(self, names):
        self.names = set(names)
        self._cur: tuple[str, int, Source] | None = None

    def begin(self, name, src):
        self._cur = (name, nbytes(src) // src.shape[0] if src.shape and src.shape[0] else 0, src) \
            if name in self.names else None
        if self._cur is not None:
            self.start(name, src)

    def wants(self, name):
        return self._cur is not None

    def update(self, name, offset, data, jobs):
        if self._cur is None or not self._cur[1]:
            return
        per = self._cur[1]
        while len(data):
            j, at = divmod(offset, per)
            take = min(per - at, len(data))
            self.slot(name, j, at, data[:take], jobs)
            data, offset = data[take:], offset + take

    def end(self, name):
        if self._cur is not None:
            self.finish(name, self._cur[2])
        self._cur = None

    def start(self, name: str, src: Source) -> None: ...

    def slot(self, name: str, j: int, at: int, data: memoryview, jobs: list) -> None: ...

    def finish(self, name: str, src: Source) -> None: ...


class ExpertHashTap(SlotTap):
    """`fingerprint.expert_tensor_sha256` of every slot, from the bytes written.

    `labels[j]`: what output slot j is hashed under: slot numbers (in the current format,
    fingerprint.TENSOR_SHA256_FORMAT) or (number, format) pairs. Its own number binds its new
    record; remove-expert also adds its slot in the source, in the format of the source's record,
    to verify that record in the same pass. `digests()` is keyed (j, number, format). The tensors
    must be written in `keys.storage_rank` order, which is the order the hash reads them.

    Format 1 hashes the bytes as they pass. Format 2 hashes nothing here: its lines take each slot's
    digest from `parts_tap`, the PartsTap of the same pass (io.native.write_native sets it), which has it
    already (known from a verified input, or hashed once for the file's parts entry)."""

    def __init__(self, record_keys: list[str], labels: list[list]):
        super().__init__(record_keys)
        self.order, self._next = list(record_keys), 0
        self.labels = [list(dict.fromkeys(lab if isinstance(lab, tuple) else (lab, TENSOR_SHA256_FORMAT)
                                          for lab in labs)) for labs in labels]
        self.v1 = {(j, n): hashlib.sha256() for j, labs in enumerate(self.labels) for n, v in labs if v == 1}
        self.v2 = [(j, n) for j, labs in enumerate(self.labels) for n, v in labs if v != 1]
        self.parts_tap: PartsTap | None = None
        self._seen: list[tuple[str, str, tuple]] = []  # (name, dtype text, slot shape) in record order

    def start(self, name, src):
        if self.order[self._next] != name:
            raise AssertionError(f"{name} written out of the expert hash order (expected {self.order[self._next]})")
        self._next += 1
        shape = tuple(src.shape[1:])
        for (j, n), h in self.v1.items():
            h.update(f"{name}[{n}]|{text(src)}|{shape}\n".encode())
        self._seen.append((name, text(src), shape))

    def wants(self, name):
        return self._cur is not None and bool(self.v1)  # format 2 needs no bytes of its own

    def slot(self, name, j, at, data, jobs):
        for n, v in self.labels[j] if j < len(self.labels) else ():
            if v == 1:
                jobs.append(functools.partial(self.v1[(j, n)].update, data))

    def digests(self) -> dict[tuple[int, int, int], str]:
        if self._next != len(self.order):
            raise AssertionError(f"expert hash saw {self._next} of {len(self.order)} tensors")
        if self.v2 and self.parts_tap is None:
            raise AssertionError("format 2 digests compose from a PartsTap's leaves; none was given")
        out = {(j, n, 1): h.hexdigest() for (j, n), h in self.v1.items()}
        out.update({(j, n, TENSOR_SHA256_FORMAT): compose(slot_line(name, n, dtype, shape, self.parts_tap.leaves[(name, j)])
                                                          for name, dtype, shape in self._seen) for j, n in self.v2})
        return out


class PartsTap(Tap):
    """The parts entry (io.digests) of each file written: its header, then each tensor, a tensor named
    in `split` slot by slot along dim 0. A part whose bytes are a verified part of an input (`known`,
    (path, start, length) -> sha256: FilePool.known) takes that digest instead of hashing the bytes
    again, so a merge of parts-recorded inputs records its output without hashing it. `leaves`
    keeps each split slot's digest, (name, j) -> sha256, for fingerprint format 2 records."""

    def __init__(self, split, known: dict | None = None):
        self.split, self.known = set(split), known if known is not None else {}
        self.parts: list[tuple[int, Any]] = []  # the current file's (length, sha256 or running hash)
        self.leaves: dict[tuple[str, int], str] = {}
        self._plan: list[tuple[int, str | None]] = []

    def header(self, head: bytes) -> None:
        """A new file begins with `head` (its safetensors header)."""
        self.parts = [(len(head), hashlib.sha256(head).hexdigest())]

    def _known(self, part) -> str | None:
        if isinstance(part, LazyTensor) and len(part.spans) == 1:
            s = part.spans[0]
            return self.known.get((s.path, s.start, s.length))
        return None

    def begin(self, name, src):
        size = nbytes(src)
        self._split = name in self.split and bool(src.shape) and src.shape[0] > 0
        if self._split:
            # The slots written: a Skipped part is read, not written; a part cast to the stack's dtype
            # has other bytes than its input's.
            slots = [p if st_name(p) == src.st else None for p in src.parts if not isinstance(p, Skipped)] \
                if isinstance(src, Stacked) else [None] * src.shape[0]
            self._plan = [(size // src.shape[0], self._known(part)) for part in slots]
        else:
            self._plan = [(size, self._known(src))]
        self._done: list[tuple[int, Any]] = []
        self._h, self._left = None, self._plan[0][0] if self._plan else 0
        if all(known is not None for _, known in self._plan):  # nothing to hash: the bytes may skip us
            self._done, self._left = list(self._plan), 0
        self._close_empty()

    def wants(self, name):
        return len(self._done) < len(self._plan)

    def _close_empty(self):
        while len(self._done) < len(self._plan) and self._left == 0:
            length, known = self._plan[len(self._done)]
            self._done.append((length, known or self._h or hashlib.sha256()))
            self._h = None
            if len(self._done) < len(self._plan):
                self._left = self._plan[len(self._done)][0]

    def update(self, name, offset, data, jobs):
        while len(data) and len(self._done) < len(self._plan):  # complete already: every part was known
            length, known = self._plan[len(self._done)]
            take = min(self._left, len(data))
            if known is None:
                self._h = self._h or hashlib.sha256()
                jobs.append(functools.partial(self._h.update, data[:take]))
            data, self._left = data[take:], self._left - take
            self._close_empty()

    def end(self, name):
        done = [(n, d if isinstance(d, str) else d.hexdigest()) for n, d in self._done]
        if self._split:
            self.leaves.update({(name, j): d for j, (_, d) in enumerate(done)})
        self.parts += [(n, d) for n, d in done if n]

    def record(self) -> dict:
        """The parts entry of the file just written."""
        return parts_record(self.parts)


class FiniteTap(SlotTap):
    """Refuses NaN / Inf in chosen slots: `checks[name][j]` = (file, key) named in the refusal. Slots of
    the files in `checked` (io.prehash.finite_checked: a child process read them already) are skipped."""

    def __init__(self, checks: dict[str, dict[int, tuple[Path, str]]], checked: frozenset = frozenset()):
        checks = {k: {j: w for j, w in slots.items() if w[0] not in checked} for k, slots in checks.items()}
        checks = {k: slots for k, slots in checks.items() if slots}
        super().__init__(checks)
        self.checks, self._dtype = checks, None

    def start(self, name, src):
        self._dtype = st_name(src)

    def slot(self, name, j, at, data, jobs):
        where = self.checks[name].get(j)
        if where is not None and len(data):
            jobs.append(functools.partial(_check_finite, data, self._dtype, where))


def _check_finite(data: memoryview, dtype: str, where: tuple[Path, str]) -> None:
    if not nonfinite(data, dtype):
        return
    raise CheckpointError(f"{where[0]}: {where[1]} holds NaN or Inf values; the expert is broken, do not merge it")
