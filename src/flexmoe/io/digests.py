"""What a `files` entry of flexmoe.json or manifest.json records of a file: its sha256, or its parts'.

An entry is either the file's sha256 (64 hex digits) or `{"parts": [[length, sha256], ...]}`: the
file cut into consecutive byte ranges from its first byte to its last, each with its own sha256
(writers cut a safetensors file into its header, then each tensor, a stacked expert tensor slot by
slot). Checking every part checks every byte, as a whole-file digest does. Parts compose where a
whole-file digest cannot: an expert slot of a merged model is a byte-for-byte copy of a tensor of
its package, so its part's digest is the digest the package records for that tensor, already
checked when the merge verified the package. A merge then records its output without reading it
back to hash it (benchmarks/merge_floor.py measures what hashing the output costs).

Standard library only: io.prehash's child processes use it before torch is imported.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from pathlib import Path
from typing import Any, Union

from flexmoe.io.errors import CheckpointError

CHUNK = 1 << 24
Record = Union[str, dict]  # a files entry: a sha256, or {"parts": [[length, sha256], ...]}
Digest = Union[str, list]  # what hashing a file gives for it: the sha256, or the parts' sha256s


def is_parts(record: Any) -> bool:
    """Whether a files entry records parts (else it is the whole file's sha256)."""
    return isinstance(record, dict)


def part_lengths(record: Record) -> list[int] | None:
    """The parts' lengths of a parts entry; None for a whole-file sha256."""
    return [int(n) for n, _ in record["parts"]] if is_parts(record) else None


def parts_record(parts: list[tuple[int, str]]) -> dict:
    """The files entry of a file cut into `parts` ((length, sha256) in file order)."""
    return {"parts": [[int(n), h] for n, h in parts]}


def entry_sha256(record: Record | None) -> str | None:
    """One sha256 naming a file by its entry: the file's sha256, or for parts the sha256 of the entry's
    canonical JSON (it commits to every part's digest, as they commit to every byte). None for None."""
    if record is None or not is_parts(record):
        return record
    return hashlib.sha256(json.dumps(record, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_file(path: str | Path, lengths: list[int] | None = None, visit=None, mapped: bool = False) -> Digest:
    """The file's sha256, or with `lengths` the sha256 of each consecutive part (read once, in order).
    Parts that do not reach the end of the file, or run past it, get a digest no record has:
    the comparison then fails and says so. `visit(offset, bytes)` sees every read, in file order.

    `mapped`: read through mmap windows (Reader), which spares copying every byte out of the page
    cache (measured here: 0.27 s against 0.31 s of CPU to hash a 0.3 GB file). Only for io.prehash's
    children: a file truncated while mapped kills the reader with SIGBUS, which the parent survives
    (it hashes that file itself)."""
    with open(path, "rb", buffering=0) as f, Reader(f, mapped) as r:
        if lengths is None:
            h = hashlib.sha256()
            while len(piece := r.read(CHUNK)):
                h.update(piece)
                if visit is not None:
                    visit(r.pos - len(piece), piece)
            return h.hexdigest()
        out = []
        for length in lengths:
            h, left = hashlib.sha256(), length
            while left:
                piece = r.read(min(left, CHUNK))
                if not len(piece):
                    break
                h.update(piece)
                if visit is not None:
                    visit(r.pos - len(piece), piece)
                left -= len(piece)
            out.append(h.hexdigest() if not left else "short")
        if r.more():
            out.append("long")  # bytes after the last part
        return out


class Reader:
    """Consecutive pieces of an open file: views of one reused buffer, or with `mapped` of a read-only
    mmap of a WINDOW-sized window at a time (so resident memory stays one window, however large
    the file: mapped pages count as the reader's RSS, which a cluster's accounting may police)."""

    WINDOW = 1 << 26

    def __init__(self, f, mapped: bool):
        self.f, self.pos, self._map, self._start, self._end = f, 0, None, 0, 0
        self._size = os.fstat(f.fileno()).st_size
        self.mapped = mapped and self._size > 0
        self._view = memoryview(b"") if self.mapped else memoryview(bytearray(CHUNK))

    def seek(self, pos: int) -> None:
        self.pos = pos
        if not self.mapped:
            self.f.seek(pos)

    def read(self, want: int) -> memoryview:
        """At most `want` bytes from the position on (fewer at a window's end; none at the file's end)."""
        if not self.mapped:
            piece = self._view[:self.f.readinto(self._view[:want])]
        else:
            if not self._start <= self.pos < self._end:
                self._remap()
            piece = self._view[self.pos - self._start:min(self.pos + want, self._end) - self._start]
        self.pos += len(piece)
        return piece

    def _remap(self) -> None:
        self._close_map()
        if self.pos >= self._size:
            self._start = self._end = self.pos
            return
        self._start = self.pos // mmap.ALLOCATIONGRANULARITY * mmap.ALLOCATIONGRANULARITY
        self._end = min(self._start + self.WINDOW, self._size)
        self._map = mmap.mmap(self.f.fileno(), self._end - self._start, offset=self._start, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)

    def _close_map(self) -> None:
        if self._map is not None:
            self._view.release()
            try:
                self._map.close()
            except BufferError:  # a caller kept a view: the map goes when that does
                pass
            self._map, self._view = None, memoryview(b"")

    def more(self) -> bool:
        """Whether the file has bytes after the position."""
        return bool(os.pread(self.f.fileno(), 1, self.pos))

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self._close_map()


def mismatch(path: str | Path, record: Record, got: Digest, recorded_in: str | Path) -> str | None:
    """None when `got` (hash_file's result) is what `record` says; else the refusal's one line."""
    if not is_parts(record):
        ok = got == record
        where = ""
    else:
        want = [h for _, h in record["parts"]]
        ok = got == want
        where = ""
        if not ok and isinstance(got, list):
            if len(got) > len(want) or "short" in got:
                where = f" (the file has {'more' if len(got) > len(want) else 'fewer'} bytes than the record's parts)"
            else:
                k = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
                start = sum(int(n) for n, _ in record["parts"][:k])
                where = f" (bytes {start}-{start + int(record['parts'][k][0]) - 1})"
    if ok:
        return None
    return f"{path}: sha256 does not match {recorded_in}{where}; the file is corrupted"


def verify(path: str | Path, record: Record, recorded_in: str | Path) -> None:
    """Hash the file as its entry says and refuse it in one line when it differs."""
    why = mismatch(path, record, hash_file(path, part_lengths(record)), recorded_in)
    if why:
        raise CheckpointError(why)


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def record_rule(value: Any) -> str | None:
    """io.schema's rule for a files entry: a sha256, or a non-empty list of [length > 0, sha256] parts."""
    if isinstance(value, str):
        return None if _HEX64.match(value) else f"is not a sha256 (64 hex digits): {value[:80]!r}"
    if not isinstance(value, dict) or set(value) != {"parts"} or not isinstance(value["parts"], list) \
            or not value["parts"]:
        return "must be a sha256 or {\"parts\": [[length, sha256], ...]}"
    for i, part in enumerate(value["parts"]):
        if not (isinstance(part, list) and len(part) == 2 and type(part[0]) is int and part[0] > 0
                and isinstance(part[1], str) and _HEX64.match(part[1])):
            return f"part {i} is {str(part)[:80]}, not [length > 0, sha256]"
    return None
