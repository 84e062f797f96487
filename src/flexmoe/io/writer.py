"""Write tensors as safetensors shards in one pass: every byte is read once, hashed as it goes, written.

An output tensor is one of:
- a `LazyTensor` (byte spans of input files),
- a `torch.Tensor` in memory (a computed router row, a trainer's state dict),
- `Stacked(parts)`: `torch.stack(parts)` without building it, each part lazy or in memory and cast
  to the stack's dtype chunk by chunk where it differs (torch.stack promotes the same way),
- `Generated(dtype, shape, make)`: a computed tensor produced in pieces (an average, chunk by chunk).

`write_tensors` plans shards (`--max-shard-size`), writes each shard's header then its tensors'
bytes, and feeds the same bytes to the shard's sha256 and to taps (per-expert hashes, value checks,
digests of slices), so nothing is read back. Input files registered with `FilePool.expect` are
verified by the same reads. Memory: one read chunk, plus whatever a caller keeps in memory.

For tests of interrupted writes, FLEXMOE_TEST_KILL_AT=shard-K (after K shards; shard-0: before the
first byte), meta (after flexmoe.json) or rename (just before the rename) makes the process kill
itself with SIGKILL there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import signal
import struct
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch

from flexmoe.io.errors import CheckpointError
from flexmoe.io.shards import INDEX, index_record, plan_shards, shard_names
from flexmoe.io.files import preallocate
from flexmoe.io.stream import CHUNK, DTYPE_NAMES, FilePool, LazyTensor, write_all

KILL_ENV = "FLEXMOE_TEST_KILL_AT"


@dataclass(frozen=True)
class Stacked:
    """`torch.stack(parts)` in `dtype`, never built: the parts' bytes one after the other."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    parts: tuple[Any, ...]  # LazyTensor | torch.Tensor | Skipped (read, not written)


@dataclass(frozen=True)
class Skipped:
    """A part of a `Stacked` that is read where it lies, its bytes handed to `on_piece`, and not written
    (remove-expert: the removed slot is hashed in the pass that copies the others)."""

    t: LazyTensor
    on_begin: Callable[[], None]
    on_piece: Callable[[memoryview], None]

    @property
    def dtype(self) -> torch.dtype:
        return self.t.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.t.shape


@dataclass(frozen=True)
class Generated:
    """A tensor of `dtype` and `shape` whose C-order values `make()` yields piece by piece."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], Iterator[torch.Tensor]]


Source = Union[LazyTensor, torch.Tensor, Stacked, Generated]


def stacked(parts: list[Any]) -> Stacked:
    """Lazy `torch.stack(parts)` with torch's dtype promotion; every part must have one shape."""
    shape = tuple(parts[0].shape)
    for p in parts[1:]:
        if tuple(p.shape) != shape:
            raise CheckpointError(f"tensors of shapes {shape} and {tuple(p.shape)} cannot be stacked")
    dtype = parts[0].dtype
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return Stacked(dtype, (len(parts),) + shape, tuple(parts))


def nbytes(src: Source) -> int:
    return math.prod(src.shape) * src.dtype.itemsize


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at `name` when FLEXMOE_TEST_KILL_AT names it."""
    if name in (os.environ.get(KILL_ENV) or "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


# --- the bytes of a source -------------------------------------------------------------------------

def _memory_pieces(t: torch.Tensor, chunk: int) -> Iterator[memoryview]:
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.contiguous().cpu()
    if t.numel() == 0:
        return
    view = memoryview(t.reshape(-1).view(torch.uint8).numpy())
    for lo in range(0, len(view), chunk):
        yield view[lo:lo + chunk]


def _cast_pieces(pieces: Iterator[memoryview], src: torch.dtype, dst: torch.dtype) -> Iterator[memoryview]:
    for c in pieces:
        yield memoryview(torch.frombuffer(c, dtype=src).to(dst).view(torch.uint8).numpy())


def source_pieces(src: Source, pool: FilePool, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The bytes of `src` in C order, in pieces that are whole elements."""
    if isinstance(src, LazyTensor):
        yield from pool.chunks(src, align=src.dtype.itemsize)
    elif isinstance(src, torch.Tensor):
        yield from _memory_pieces(src, chunk)
    elif isinstance(src, Stacked):
        for part in src.parts:
            if isinstance(part, Skipped):
                part.on_begin()
                for c in pool.chunks(part.t, align=part.t.dtype.itemsize):
                    part.on_piece(c)
                continue
            pieces = source_pieces(part, pool, chunk)
            yield from pieces if part.dtype == src.dtype else _cast_pieces(pieces, part.dtype, src.dtype)
    elif isinstance(src, Generated):
        for piece in src.make():
            if piece.dtype != src.dtype:
                raise AssertionError(f"generated piece of {piece.dtype}, declared {src.dtype}")
            yield from _memory_pieces(piece, chunk)
    else:
        raise TypeError(f"cannot write {type(src).__name__}")


# --- taps: what else the bytes are fed to -----------------------------------------------------------

class Tap:
    """Sees every output tensor's bytes as they are written: begin, pieces at byte offsets, end.

    `update` appends its work to `jobs` (callables; hashlib and torch release the GIL), which the
    writer runs in parallel with the write and waits for before the next piece is read."""

    def begin(self, name: str, src: Source) -> None: ...

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

    `labels[j]`: the slot numbers output slot j is hashed under (its own; remove-expert also adds
    its slot in the source, to verify the source's records in the same pass). The tensors must be
    written in `keys.storage_rank` order, which is the order the hash reads them."""

    def __init__(self, record_keys: list[str], labels: list[list[int]]):
        super().__init__(record_keys)
        self.order, self._next = list(record_keys), 0
        self.labels = [list(dict.fromkeys(labs)) for labs in labels]  # a slot hashed once per number
        self.hashers = {(j, lab): hashlib.sha256() for j, labs in enumerate(self.labels) for lab in labs}

    def start(self, name, src):
        if self.order[self._next] != name:
            raise AssertionError(f"{name} written out of the expert hash order (expected {self.order[self._next]})")
        self._next += 1
        shape = tuple(src.shape[1:])
        for (j, lab), h in self.hashers.items():
            h.update(f"{name}[{lab}]|{src.dtype}|{shape}\n".encode())

    def slot(self, name, j, at, data, jobs):
        for lab in self.labels[j]:
            jobs.append(functools.partial(self.hashers[(j, lab)].update, data))

    def digests(self) -> dict[tuple[int, int], str]:
        if self._next != len(self.order):
            raise AssertionError(f"expert hash saw {self._next} of {len(self.order)} tensors")
        return {k: h.hexdigest() for k, h in self.hashers.items()}


class FiniteTap(SlotTap):
    """Refuses NaN / Inf in chosen slots: `checks[name][j]` = (file, key) named in the refusal."""

    def __init__(self, checks: dict[str, dict[int, tuple[Path, str]]]):
        super().__init__(checks)
        self.checks, self._dtype = checks, None

    def start(self, name, src):
        self._dtype = src.dtype

    def slot(self, name, j, at, data, jobs):
        where = self.checks[name].get(j)
        if where is not None and len(data):
            jobs.append(functools.partial(_check_finite, torch.frombuffer(data, dtype=self._dtype), where))


def _check_finite(values: torch.Tensor, where: tuple[Path, str]) -> None:
    # A sum is finite only if every value is (or it overflowed: then look at each value).
    if math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all()):
        return
    raise CheckpointError(f"{where[0]}: {where[1]} holds NaN or Inf values; the expert is broken, do not merge it")


# --- the pass -----------------------------------------------------------------------------------------

def _header(tensors: dict[str, Source], keys: list[str], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for k in keys:
        t, size = tensors[k], nbytes(tensors[k])
        header[k] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, tensors: dict[str, Source], pool: FilePool, *, metadata: dict[str, str] | None = None,
               taps: tuple[Tap, ...] = (), progress=None) -> str:
    """Write `tensors` (in dict order) as one safetensors file; returns its sha256, taken on the way."""
    h = hashlib.sha256()
    queued, pool.jobs = pool.jobs, []  # input hashes join this writer's jobs
    try:
        _write_pieces(path, tensors, pool, h, metadata, taps, progress)
    finally:
        pool._flush()
        pool.jobs = queued
    return h.hexdigest()


def _write_pieces(path, tensors, pool, h, metadata, taps, progress) -> None:
    with open(path, "wb", buffering=0) as f:
        head = _header(tensors, list(tensors), metadata or {"format": "pt"})
        preallocate(f, len(head) + sum(nbytes(t) for t in tensors.values()))
        h.update(head)
        write_all(f, head)
        for k, src in tensors.items():
            offset = 0
            for tap in taps:
                tap.begin(k, src)
            for piece in source_pieces(src, pool):
                jobs = [*pool.jobs, functools.partial(h.update, piece)]
                pool.jobs.clear()
                for tap in taps:
                    tap.update(k, offset, piece, jobs)
                _run(jobs, len(piece), lambda: write_all(f, piece))
                offset += len(piece)
                if progress is not None:
                    progress.advance(len(piece))
            if offset != nbytes(src):
                raise AssertionError(f"{k}: wrote {offset} bytes, its header says {nbytes(src)}")
            for tap in taps:
                tap.end(k)


_EXECUTOR: ThreadPoolExecutor | None = None


def _forget_executor() -> None:
    # A forked child (a gloo rank, a test's helper process) inherits the pool object but none of its
    # threads: submitting to it would wait forever. The child makes its own.
    global _EXECUTOR
    _EXECUTOR = None


os.register_at_fork(after_in_child=_forget_executor)
PARALLEL_MIN = 1 << 20  # pieces smaller than this are hashed in this thread


def _run(jobs: list, size: int, write: Callable[[], None]) -> None:
    """Run `jobs` (hashes, checks) and `write` at once; return when all are done (the piece's buffer is
    then free), raising the first job's error."""
    global _EXECUTOR
    workers = min(8, os.cpu_count() or 1)
    if size < PARALLEL_MIN or workers < 2:
        for job in jobs:
            job()
        write()
        return
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="flexmoe-hash")
    futures = [_EXECUTOR.submit(job) for job in jobs]
    try:
        write()
    finally:
        wait(futures)
    for fut in futures:
        fut.result()


def write_tensors(tmp: Path, tensors: dict[str, Source], pool: FilePool, *, max_shard_size: int | None = None,
                  taps: tuple[Tap, ...] = (), progress=None) -> dict[str, str]:
    """Write `tensors` (in dict order) into directory `tmp` as `model.safetensors`, or as shards of at
    most `max_shard_size` bytes plus `model.safetensors.index.json`; returns {file name: sha256}."""
    keys = list(tensors)
    shards = plan_shards([(k, nbytes(tensors[k])) for k in keys], max_shard_size)
    names = shard_names(len(shards))
    files: dict[str, str] = {}
    kill_point("shard-0")
    for n, (name, shard) in enumerate(zip(names, shards), start=1):
        files[name] = write_file(tmp / name, {k: tensors[k] for k in shard}, pool, taps=taps, progress=progress)
        if progress is not None and len(shards) > 1:
            progress.shard_done(name, n, len(shards))
        kill_point(f"shard-{n}")
    if len(shards) > 1:
        text = json.dumps(index_record(names, shards, sum(nbytes(t) for t in tensors.values())), indent=2,
                          sort_keys=True) + "\n"
        (tmp / INDEX).write_text(text)
        files[INDEX] = hashlib.sha256(text.encode()).hexdigest()
    return files
