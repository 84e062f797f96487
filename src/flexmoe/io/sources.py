"""What a writer writes (io.writer): an output tensor and the bytes it is made of.

An output tensor is one of:
- a `LazyTensor` (byte spans of input files, io.stream),
- a `torch.Tensor` in memory (a computed router row, a trainer's state dict),
- `Stacked(parts)`: `torch.stack(parts)` without building it, each part lazy or in memory and cast
  to the stack's dtype chunk by chunk where it differs (torch.stack promotes the same way),
- `Generated(dtype, shape, make)`: a computed tensor produced in pieces (an average, chunk by chunk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

import torch

from flexmoe.io.errors import CheckpointError
from flexmoe.io.stream import CHUNK, FilePool, LazyTensor

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
