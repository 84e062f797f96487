"""Write tensors as safetensors shards in one pass: every byte is read once, recorded as it goes, written.

What an output tensor may be (a byte span of an input, a tensor in memory, a stack, a generated
tensor) is io.sources'; what else its bytes are fed to (hashes, value checks), io.taps'.
`write_tensors` plans shards (`--max-shard-size`), writes each shard's header then its tensors'
bytes, and feeds the same bytes to the shard's sha256 (or with a PartsTap, its parts' digests:
io.digests) and to taps, so nothing is read back. Input files registered with `FilePool.expect`
are verified by the same reads. Memory: one read chunk, plus whatever a caller keeps in memory.

For tests of interrupted writes, FLEXMOE_TEST_KILL_AT=shard-K (after K shards were written or
handed to io.copier's thread; shard-0: before the first byte), meta (after flexmoe.json) or rename (just before the rename) makes the process kill
itself with SIGKILL there.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import struct
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

from flexmoe.io.copier import ShardCopier
from flexmoe.io.files import preallocate
from flexmoe.io.prehash import usable_cpus
from flexmoe.io.shards import INDEX, index_record, plan_shards, shard_names
from flexmoe.io.sources import (Generated, Skipped, Source, Stacked, nbytes, source_pieces,  # noqa: F401  (re-exported)
                                stacked)
from flexmoe.io.dtypes import st_name
from flexmoe.io.stream import FilePool, LazyTensor, write_all
from flexmoe.io.taps import ExpertHashTap, FiniteTap, PartsTap, SlotTap, Tap  # noqa: F401  (re-exported)

KILL_ENV = "FLEXMOE_TEST_KILL_AT"
COPY_THREADS = 2  # measured on 2 cores only (io/copier.py)


def kill_point(name: str) -> None:
    """Test hook: SIGKILL this process at `name` when FLEXMOE_TEST_KILL_AT names it."""
    if name in (os.environ.get(KILL_ENV) or "").split(","):
        os.kill(os.getpid(), signal.SIGKILL)


# --- the pass -----------------------------------------------------------------------------------------

def _header(tensors: dict[str, Source], keys: list[str], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for k in keys:
        t, size = tensors[k], nbytes(tensors[k])
        header[k] = {"dtype": st_name(t), "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def write_file(path: Path, tensors: dict[str, Source], pool: FilePool, *, metadata: dict[str, str] | None = None,
               taps: tuple[Tap, ...] = (), progress=None) -> str | dict:
    """Write `tensors` (in dict order) as one safetensors file; returns its files entry, taken on the
    way: the sha256, or with a PartsTap among `taps` its parts (io.digests)."""
    return _write_file(path, tensors, pool, metadata=metadata, taps=taps, progress=progress)[0]


def _write_file(path: Path, tensors: dict[str, Source], pool: FilePool, *, metadata: dict[str, str] | None = None,
                taps: tuple[Tap, ...] = (), progress=None, copier: ShardCopier | None = None):
    """write_file; with `copier`, the kernel copies no tap needs to see are left to its worker thread:
    returns (entry, the copies' future or None). The entry needs none of those bytes."""
    parts = next((t for t in taps if isinstance(t, PartsTap)), None)
    h = hashlib.sha256() if parts is None else None
    queued, pool.jobs = pool.jobs, []  # input hashes join this writer's jobs
    try:
        deferred = _write_pieces(path, tensors, pool, h, parts, metadata, taps, progress, copier is not None)
    finally:
        pool._flush()
        pool.jobs = queued
    future = copier.submit(path, deferred) if deferred else None
    return (h.hexdigest() if parts is None else parts.record()), future


def _write_pieces(path, tensors, pool, h, parts, metadata, taps, progress, defer: bool) -> list:
    deferred: list[tuple[int, int, int, int, Path]] = []  # (source fd, at, length, destination at, source)
    with open(path, "wb", buffering=0) as f:
        head = _header(tensors, list(tensors), metadata or {"format": "pt"})
        preallocate(f, len(head) + sum(nbytes(t) for t in tensors.values()))
        if parts is not None:
            parts.header(head)
        else:
            h.update(head)
        write_all(f, head)
        at = len(head)  # where the next tensor starts: a deferred copy leaves a gap the thread fills
        for k, src in tensors.items():
            offset = 0
            for tap in taps:
                tap.begin(k, src)
            spans = _spans(src) if h is None and not any(tap.wants(k) for tap in taps) else None
            if spans is not None and defer and all(pool.deferrable(p) for p in spans):
                for part in spans:
                    for fd, start, length, path_ in pool.span_fds(part):
                        deferred.append((fd, start, length, at + offset, path_))
                        offset += length
                spans = []
            elif f.tell() != at:
                f.seek(at)
            for part in spans or ():  # no one needs the bytes: copied in the kernel (copy_file_range)
                for n in pool.copy_into(part, f):
                    offset += n
                    if progress is not None:
                        progress.advance(n)
            for piece in source_pieces(src, pool) if spans is None else ():
                jobs = [*pool.jobs, *([functools.partial(h.update, piece)] if h is not None else [])]
                pool.jobs.clear()
                for tap in taps:
                    tap.update(k, offset, piece, jobs)
                _run(jobs, len(piece), lambda: write_all(f, piece))
                offset += len(piece)
                if progress is not None:
                    progress.advance(len(piece))
            if offset != nbytes(src):
                raise AssertionError(f"{k}: wrote {offset} bytes, its header says {nbytes(src)}")
            at += offset
            for tap in taps:
                tap.end(k)
    return deferred


def _spans(src: Source) -> list[LazyTensor] | None:
    """The input byte spans `src` is, in order, when it is nothing but a copy of them."""
    if isinstance(src, LazyTensor):
        return [src]
    if isinstance(src, Stacked) and all(isinstance(p, LazyTensor) and p.st == src.st for p in src.parts):
        return list(src.parts)
    return None


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
                  taps: tuple[Tap, ...] = (), progress=None) -> dict[str, str | dict]:
    """Write `tensors` (in dict order) into directory `tmp` as `model.safetensors`, or as shards of at
    most `max_shard_size` bytes plus `model.safetensors.index.json`; returns {file name: files entry}
    (a sha256, or parts with a PartsTap among `taps`)."""
    keys = list(tensors)
    shards = plan_shards([(k, nbytes(tensors[k])) for k in keys], max_shard_size)
    names = shard_names(len(shards))
    files: dict[str, str] = {}
    kill_point("shard-0")
    # Two or more shards and CPUs: a shard's kernel copies run on a thread while the next is written.
    copier = ShardCopier(min(COPY_THREADS, usable_cpus())) if len(shards) > 1 and usable_cpus() > 1 else None
    try:
        for n, (name, shard) in enumerate(zip(names, shards), start=1):
            files[name], future = _write_file(tmp / name, {k: tensors[k] for k in shard}, pool, taps=taps,
                                              progress=progress, copier=copier)
            if copier is not None:
                copier.shard(name, n, len(shards), future, progress)
            elif progress is not None and len(shards) > 1:
                progress.shard_done(name, n, len(shards))
            kill_point(f"shard-{n}")
        if copier is not None:
            copier.finish(progress)
    finally:
        if copier is not None:
            copier.close()
    if len(shards) > 1:
        text = json.dumps(index_record(names, shards, sum(nbytes(t) for t in tensors.values())), indent=2,
                          sort_keys=True) + "\n"
        (tmp / INDEX).write_text(text)
        files[INDEX] = hashlib.sha256(text.encode()).hexdigest()
    return files
