"""What a writer writes (io.writer): an output tensor and the bytes it is made of.

An output tensor is one of:
- a `LazyTensor` (byte spans of input files, io.stream),
- a tensor in memory, torch's or a numpy array (a computed router row, a trainer's state dict),
- `Stacked(parts)`: `torch.stack(parts)` without building it, each part lazy or in memory and cast
  to the stack's dtype chunk by chunk where it differs (torch.stack promotes the same way),
- `Generated(dtype, shape, make)`: a computed tensor produced in pieces (an average, chunk by chunk).

Nothing here imports torch unless a source is a torch tensor or needs a cast: a merge of lazy
tensors and numpy router rows runs without it (io.dtypes says why).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Union

from flexmoe.io.dtypes import name_of, st_name, torch_dtype
from flexmoe.io.dtypes import nbytes as nbytes  # re-exported: writers and taps size sources with it
from flexmoe.io.errors import CheckpointError
from flexmoe.io.stream import CHUNK, FilePool, LazyTensor


@dataclass(frozen=True)
class Stacked:
    """`torch.stack(parts)` in dtype `st` (a safetensors name), never built: the parts' bytes one after
    the other."""

    st: str
    shape: tuple[int, ...]
    parts: tuple[Any, ...]  # LazyTensor | an in-memory tensor | Skipped (read, not written)

    @property
    def dtype(self):
        return torch_dtype(self.st)


@dataclass(frozen=True)
class Skipped:
    """A part of a `Stacked` that is read where it lies, its bytes handed to `on_piece`, and not written
    (remove-expert: the removed slot is hashed in the pass that copies the others)."""

    t: LazyTensor
    on_begin: Callable[[], None]
    on_piece: Callable[[memoryview], None]

    @property
    def st(self) -> str:
        return self.t.st

    @property
    def dtype(self):
        return self.t.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.t.shape


@dataclass(frozen=True)
class Generated:
    """A tensor of `dtype` and `shape` whose C-order values `make()` yields piece by piece."""

    dtype: Any  # torch's
    shape: tuple[int, ...]
    make: Callable[[], Iterator[Any]]  # torch tensors


Source = Union[LazyTensor, Any, Stacked, Generated]


def stacked(parts: list[Any]) -> Stacked:
    """Lazy `torch.stack(parts)` with torch's dtype promotion; every part must have one shape."""
    shape = tuple(parts[0].shape)
    for p in parts[1:]:
        if tuple(p.shape) != shape:
            raise CheckpointError(f"tensors of shapes {shape} and {tuple(p.shape)} cannot be stacked")
    names = {st_name(p) for p in parts}
    st = names.pop() if len(names) == 1 else _promoted(parts)
    return Stacked(st, (len(parts),) + shape, tuple(parts))


def _promoted(parts: list[Any]) -> str:
    import torch

    dtype = torch_dtype(st_name(parts[0]))
    for p in parts[1:]:
        dtype = torch.promote_types(dtype, torch_dtype(st_name(p)))
    return name_of(dtype)


# --- the bytes of a source -------------------------------------------------------------------------

def _is_torch(t: Any) -> bool:
    torch = sys.modules.get("torch")  # a torch tensor exists only once torch is imported
    return torch is not None and isinstance(t, torch.Tensor)


def _memory_pieces(t: Any, chunk: int) -> Iterator[memoryview]:
    if _is_torch(t):
        import torch

        t = t.detach()
        if t.device.type != "cpu" or not t.is_contiguous():
            t = t.contiguous().cpu()
        data = t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    else:  # a numpy array
        import numpy as np

        data = np.ascontiguousarray(t).reshape(-1).view(np.uint8)
    view = memoryview(data).cast("B") if len(data) else memoryview(b"")
    for lo in range(0, len(view), chunk):
        yield view[lo:lo + chunk]


def _cast_pieces(pieces: Iterator[memoryview], src: str, dst: str) -> Iterator[memoryview]:
    import torch

    for c in pieces:
        yield memoryview(torch.frombuffer(c, dtype=torch_dtype(src)).to(torch_dtype(dst)).view(torch.uint8).numpy())


def source_pieces(src: Source, pool: FilePool, chunk: int = CHUNK) -> Iterator[memoryview]:
    """The bytes of `src` in C order, in pieces that are whole elements."""
    if isinstance(src, LazyTensor):
        yield from pool.chunks(src, align=src.itemsize)
    elif isinstance(src, Stacked):
        for part in src.parts:
            if isinstance(part, Skipped):
                part.on_begin()
                for c in pool.chunks(part.t, align=part.t.itemsize):
                    part.on_piece(c)
                continue
            pieces = source_pieces(part, pool, chunk)
            have = st_name(part)
            yield from pieces if have == src.st else _cast_pieces(pieces, have, src.st)
    elif isinstance(src, Generated):
        for piece in src.make():
            if piece.dtype != src.dtype:
                raise AssertionError(f"generated piece of {piece.dtype}, declared {src.dtype}")
            yield from _memory_pieces(piece, chunk)
    elif hasattr(src, "dtype") and hasattr(src, "shape"):
        yield from _memory_pieces(src, chunk)
    else:
        raise TypeError(f"cannot write {type(src).__name__}")
