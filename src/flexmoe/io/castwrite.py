"""One safetensors file of lazy tensors (io.stream), optionally cast: export-hf's shards and the
native-only extras file. (Native model weights go through io.writer, which taps the bytes.)"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

from flexmoe.io.dtypes import FLOATING, ITEMSIZE, name_of
from flexmoe.io.files import preallocate, sha256_file
from flexmoe.io.stream import FilePool, LazyTensor, write_all


def out_dtype(t: LazyTensor, cast):
    """The torch dtype `t` is written in: `cast` (a torch dtype) applies to floating-point tensors only."""
    return cast if cast is not None and t.st in FLOATING else t.dtype


def out_nbytes(t: LazyTensor, cast) -> int:
    return math.prod(t.shape) * ITEMSIZE[_out_name(t, cast)]


def _out_name(t: LazyTensor, cast) -> str:
    return name_of(cast) if cast is not None and t.st in FLOATING else t.st


def write_file(path: str | Path, tensors: dict[str, LazyTensor], pool: FilePool, *, cast=None,
               metadata: dict[str, str] | None = None, progress=None, digest: bool = True) -> str | None:
    """Write `tensors` (in dict order) as one safetensors file; returns its sha256 (None without `digest`).

    The sha256 is taken by reading the file back (from the page cache), which costs less than
    passing every byte through Python on the way in.
    """
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    pos = 0
    for name, t in tensors.items():
        size = out_nbytes(t, cast)
        header[name] = {"dtype": _out_name(t, cast), "shape": list(t.shape), "data_offsets": [pos, pos + size]}
        pos += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # tensor data starts 8-byte aligned, as safetensors writes it
    # Unbuffered, so kernel copies (copy_file_range) and our writes share one file position.
    with open(path, "wb", buffering=0) as f:
        preallocate(f, 8 + len(raw) + pos)
        write_all(f, struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if _out_name(t, cast) == t.st:
                steps: Iterator[int] = pool.copy_into(t, f)
            else:
                steps = _cast_into(t, cast, pool, f)
            for n in steps:
                if progress is not None:
                    progress.advance(n)
    return sha256_file(path) if digest else None


def _cast_into(t: LazyTensor, dst, pool: FilePool, out) -> Iterator[int]:
    import torch

    for c in pool.chunks(t, align=t.itemsize):
        data = torch.frombuffer(c, dtype=t.dtype).to(dst).view(torch.uint8).numpy()
        write_all(out, data)
        yield len(data)
