"""Streaming safetensors: tensors described as byte spans of files, copied to new files chunk by chunk.

Every conversion here (import-hf, export-hf, remove-expert) only re-arranges bytes: an HF
per-expert tensor is one slot of a native stacked `[E, ...]` tensor and a stacked tensor is its
experts' bytes back to back. So an output tensor is a list of byte spans of its inputs, copied
span by span (in the kernel with copy_file_range where it can, else in 16 MiB chunks): memory
stays at one chunk whatever the model size. Files are read with plain reads, not memory-mapped,
because mapped pages count as resident memory for as long as a file stays open. Nothing is ever
unpickled.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flexmoe.io import prehash
from flexmoe.io.dtypes import ITEMSIZE, NAMES, torch_dtype
from flexmoe.io.digests import hash_file, is_parts, mismatch, part_lengths
from flexmoe.io.errors import CheckpointError
from flexmoe.io.fingerprint import stream_fingerprint  # noqa: F401  (re-exported: it reads through a FilePool)

CHUNK = 1 << 24  # 16 MiB: enough for full disk speed, negligible next to any real model
COPY_STEP = 1 << 26  # bytes per copy_file_range call: progress granularity, no memory cost
MAX_HEADER = 100 << 20  # a header beyond this is a corrupt length field, not a real model


@dataclass(frozen=True)
class Span:
    """Bytes [start, start + length) of one file."""

    path: Path
    start: int
    length: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor whose C-order bytes are the concatenation of `spans`; nothing is read until asked.
    `st` is its dtype's safetensors name; `dtype` gives torch's (importing torch: a merge plans and
    copies with `st` and `itemsize` alone, io.dtypes)."""

    st: str
    shape: tuple[int, ...]
    spans: tuple[Span, ...]

    @property
    def dtype(self):
        return torch_dtype(self.st)

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.st]

    @property
    def nbytes(self) -> int:
        return sum(s.length for s in self.spans)

    @property
    def path(self) -> Path:
        """The file holding the first byte (for error messages)."""
        return self.spans[0].path

    def rows(self, start: int, stop: int) -> "LazyTensor":
        """Rows [start, stop) along dim 0."""
        n = self.shape[0]
        if not 0 <= start < stop <= n:
            raise IndexError(f"rows {start}:{stop} out of range for dim 0 of size {n}")
        row = self.nbytes // n
        return LazyTensor(self.st, (stop - start,) + self.shape[1:], _cut(self.spans, start * row, (stop - start) * row))

    def __getitem__(self, j: int) -> "LazyTensor":
        """Slot j along dim 0 (so `fingerprint.anchor_view`'s `v[0]` works on lazy tensors)."""
        r = self.rows(j, j + 1)
        return LazyTensor(self.st, self.shape[1:], r.spans)

    def flat(self, start: int, stop: int) -> "LazyTensor":
        """Elements [start, stop) of the flattened tensor, as a 1-D lazy tensor."""
        size = self.itemsize
        return LazyTensor(self.st, (stop - start,), _cut(self.spans, start * size, (stop - start) * size))


def stack(parts: list[LazyTensor]) -> LazyTensor:
    """Lazy `torch.stack(parts)`: the parts' bytes back to back; all must agree in dtype and shape."""
    first = parts[0]
    for p in parts[1:]:
        if p.st != first.st or p.shape != first.shape:
            raise CheckpointError(f"{p.path}: a tensor has {p.st} {p.shape} where its sibling in {first.path} "
                                  f"has {first.st} {first.shape}; experts of one layer must agree")
    return LazyTensor(first.st, (len(parts),) + first.shape, tuple(s for p in parts for s in p.spans))


def _cut(spans: tuple[Span, ...], offset: int, length: int) -> tuple[Span, ...]:
    out: list[Span] = []
    for s in spans:
        if length == 0:
            break
        if offset >= s.length:
            offset -= s.length
            continue
        take = min(s.length - offset, length)
        out.append(Span(s.path, s.start + offset, take))
        offset, length = 0, length - take
    return tuple(out)


# --- reading -------------------------------------------------------------------------------------

def read_header(path: str | Path) -> tuple[dict[str, LazyTensor], dict[str, str]]:
    """Tensors and `__metadata__` of a safetensors file, with the header checked against the file size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER):
            raise CheckpointError(f"{path}: not a safetensors file (bad header length); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); re-download or re-save it") from e
    meta = header.pop("__metadata__", None) or {}
    base, out, end = 8 + n, {}, 0
    try:
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, e in entries:
            dtype = e["dtype"]
            if dtype not in NAMES:
                raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {e['dtype']}")
            shape = tuple(int(d) for d in e["shape"])
            lo, hi = (int(x) for x in e["data_offsets"])
            if lo != end or hi - lo != math.prod(shape) * ITEMSIZE[dtype]:
                raise CheckpointError(f"{path}: tensor {name} has inconsistent offsets {lo}:{hi}; the header is corrupt")
            out[name], end = LazyTensor(dtype, shape, (Span(path, base + lo, hi - lo),)), hi
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}: malformed safetensors header ({e!r}); re-download or re-save it") from e
    if base + end != size:
        what = "truncated" if base + end > size else "longer than its header says"
        raise CheckpointError(f"{path}: {what}: the header needs {base + end} bytes, the file has {size}; "
                              "re-download or re-save it")
    return out, meta


class FilePool:
    """Open read handles by path, closed together; one reusable chunk buffer.

    A file registered with `expect(path, sha256, ...)` is hashed as it is read: bytes read at the
    position hashed so far extend the hash, a read at most one chunk further first hashes the gap
    (re-reading it: counted in `gap_bytes`), a read behind or far ahead adds nothing.
    `check_expected()` hashes what no read reached (also counted) and refuses a mismatch. So an
    input is verified by the pass that copies it, and read once when the pass follows its file
    order (keys.storage_order); any other order costs re-reads, never a wrong answer. A file that a
    child process is hashing (io.prehash, started by a command before it imports torch) is not
    hashed here: `check_expected` takes the child's digest, refusing a file changed since."""

    def __init__(self, chunk: int = CHUNK):
        self._files: dict[Path, Any] = {}
        self._buf = bytearray(chunk)
        self._expect: dict[Path, tuple[str, str]] = {}  # path -> (sha256, file that records it)
        self._hash: dict[Path, tuple[Any, int]] = {}  # path -> (running sha256, bytes hashed)
        self.gap_bytes = 0
        # (path, start, length) -> sha256 of those bytes, from parts entries verified by check_expected.
        self.known: dict[tuple[Path, int, int], str] = {}
        self._unchanged: dict[Path, list[int]] = {}  # their files' (size, mtime, inode, device) when verified
        # When a list (io.writer sets one), hash updates of data just read are queued here for the
        # writer to run in parallel with its own; whatever is left runs before the next read.
        self.jobs: list | None = None

    def _flush(self) -> None:
        if self.jobs:
            pending, self.jobs[:] = list(self.jobs), []
            for job in pending:
                job()

    def expect(self, path: Path, digest: str | dict, recorded_in: Path | str) -> None:
        """Verify `path` against its files entry `digest` (listed in `recorded_in`) as it is read; an
        entry that records parts (io.digests) is checked part by part in `check_expected`."""
        path = Path(path)
        self._expect[path] = (digest, str(recorded_in))
        pre = prehash.active()
        if (pre is not None and pre.covers(path)) or is_parts(digest):
            return  # a child process hashes it (io.prehash), or check_expected does, part by part
        self._hash[path] = (hashlib.sha256(), 0)

    def _track(self, path: Path, start: int, data) -> None:
        state = self._hash.get(path)
        if state is None:
            return
        h, pos = state
        if start > pos + len(self._buf):
            return  # far ahead (a small tensor read up front): hashed when the hash gets there
        if start > pos:  # a few bytes skipped over (a router row read up front): hash them now
            self._hash_range(path, h, pos, start)
            pos = start
        end = start + len(data)
        if end > pos:
            if self.jobs is not None:
                self.jobs.append(functools.partial(h.update, memoryview(data)[pos - start:]))
            else:
                h.update(memoryview(data)[pos - start:])
            pos = end
        self._hash[path] = (h, pos)

    def _hash_range(self, path: Path, h, start: int, stop: int) -> None:
        self._flush()
        f, buf = self._file(path), bytearray(min(len(self._buf), max(stop - start, 0)) or 1)
        f.seek(start)
        while start < stop:
            got = f.readinto(memoryview(buf)[:min(len(buf), stop - start)])
            if not got:
                break  # a short file: its hash will not match
            h.update(memoryview(buf)[:got])
            start += got
            self.gap_bytes += got

    def prehashed(self) -> list[Path]:
        """The expected files a child process hashes (io.prehash)."""
        return [p for p in self._expect if p not in self._hash]

    def check_expected(self, paths=None) -> None:
        """Finish the hashes of the expected files (all, or `paths`); refuse the first that differs, and
        any file whose verified parts a writer may have copied unhashed (`known`) and that changed since."""
        for path, stat in self._unchanged.items():
            if prehash.stat_key(path) != stat:
                raise CheckpointError(f"{path}: changed while it was being read; re-run once nothing writes to it")
        for path in list(self._expect if paths is None else paths):
            if path not in self._expect:
                continue
            if path in self._hash:
                h, pos = self._hash.pop(path)
                self._hash_range(path, h, pos, path.stat().st_size)
                got = h.hexdigest()
            else:  # hashed by a child process (io.prehash, which compares this stat), or here
                pre, stat = prehash.active(), prehash.stat_key(path)
                got = (pre.digest(path) if pre is not None and pre.covers(path) else None) \
                    or hash_file(path, part_lengths(self._expect[path][0]))
            digest, recorded_in = self._expect.pop(path)
            why = mismatch(path, digest, got, recorded_in)
            if why:
                raise CheckpointError(why)
            if is_parts(digest):  # verified: a writer may take these parts' digests instead of hashing them
                self._unchanged[path] = stat
                start = 0
                for n, h in digest["parts"]:
                    self.known[(path, start, n)] = h
                    start += n

    def blame(self, error: Exception, paths=None) -> Exception:
        """The error to report for a refusal met while files were still being verified: a file whose
        sha256 does not match comes first (it explains the rest), as if it had been checked up front."""
        try:
            self.check_expected(paths)
        except CheckpointError as e:
            return e
        return error

    def __enter__(self) -> "FilePool":
        return self

    def __exit__(self, *exc) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def _file(self, path: Path):
        if path not in self._files:
            self._files[path] = open(path, "rb")
        return self._files[path]

    def chunks(self, t: LazyTensor, align: int = 1) -> Iterator[memoryview]:
        """The tensor's bytes, in views valid until the next one; each a multiple of `align` bytes."""
        step = len(self._buf) // align * align
        view = memoryview(self._buf)
        for s in t.spans:
            f, done = self._file(s.path), 0
            while done < s.length:
                self._flush()  # queued hashes of the last chunk read, before its buffer is reused
                # Spans of tensors are whole elements, so every chunk stays aligned.
                want = min(step, s.length - done)
                f.seek(s.start + done)
                got = f.readinto(view[:want])
                if got != want:
                    raise CheckpointError(f"{s.path}: ended early while reading; the file changed or is truncated")
                self._track(s.path, s.start + done, view[:got])
                done += got
                yield view[:got]

    def deferrable(self, t: LazyTensor) -> bool:
        """Whether another thread may copy `t` in the kernel (io.copier): no span feeds a hash here."""
        return hasattr(os, "copy_file_range") and all(s.path not in self._hash for s in t.spans)

    def span_fds(self, t: LazyTensor) -> list[tuple[int, int, int, Path]]:
        """(fd, start, length, path) of each span, its file opened here (a copier thread only reads
        through the fd at explicit offsets, which leave this pool's file positions alone)."""
        return [(self._file(s.path).fileno(), s.start, s.length, s.path) for s in t.spans]

    def copy_into(self, t: LazyTensor, out) -> Iterator[int]:
        """Append the tensor's bytes to raw file `out`, yielding bytes done per step.

        Copies in the kernel with copy_file_range where it can: on a 2-core VM it was 3-9x
        faster than passing the bytes through Python. Falls back to plain reads and writes.
        """
        fast = hasattr(os, "copy_file_range")
        for s in t.spans:
            done = 0
            direct = fast and s.path not in self._hash  # a file being verified passes through the hash
            while direct and done < s.length:
                try:
                    n = os.copy_file_range(self._file(s.path).fileno(), out.fileno(), min(COPY_STEP, s.length - done),
                                           s.start + done)
                except OSError:  # e.g. a filesystem or kernel without it: the rest goes the slow way
                    fast = direct = False
                    break
                if n == 0:
                    raise CheckpointError(f"{s.path}: ended early while reading; the file changed or is truncated")
                done += n
                yield n
            if done < s.length:
                for c in self.chunks(LazyTensor("U8", (s.length - done,), (Span(s.path, s.start + done, s.length - done),))):
                    write_all(out, c)
                    yield len(c)

    def read_bytes(self, t: LazyTensor) -> bytearray:
        """The tensor's bytes in memory (for small tensors, or one expert slot)."""
        self._flush()
        buf, pos = bytearray(t.nbytes), 0
        for s in t.spans:
            f = self._file(s.path)
            f.seek(s.start)
            view = memoryview(buf)[pos:pos + s.length]
            if f.readinto(view) != s.length:
                raise CheckpointError(f"{s.path}: ended early while reading; the file changed or is truncated")
            self._track(s.path, s.start, view)
            pos += s.length
        return buf

    def read(self, t: LazyTensor):
        """The whole tensor in memory as a torch tensor (imports torch)."""
        import torch

        data = self.read_bytes(t)
        if not data:
            return torch.empty(t.shape, dtype=t.dtype)
        return torch.frombuffer(data, dtype=torch.uint8).view(t.dtype).reshape(t.shape)


# --- writing -------------------------------------------------------------------------------------

def write_all(out, data) -> None:
    """Write all of `data` to raw (unbuffered) file `out`, which may take partial writes."""
    view = memoryview(data).cast("B")
    while len(view):
        view = view[out.write(view):]
