"""Tensor dtypes by their safetensors names, without importing torch.

A merge plans and copies byte spans: it needs each tensor's element size and the dtype text its
records hash ("torch.bfloat16"), not torch itself, whose import costs 2-3 s of CPU (measured on
the 2-core VM: about as much as hashing 2.5 GB). The names here are the ones a safetensors header
carries; `torch_dtype` maps one to torch's where a caller computes with torch anyway.
"""

from __future__ import annotations

import math
from typing import Any

# safetensors name -> (torch's name, bytes per element, floating point)
_TABLE = {
    "F64": ("float64", 8, True), "F32": ("float32", 4, True), "F16": ("float16", 2, True),
    "BF16": ("bfloat16", 2, True), "F8_E4M3": ("float8_e4m3fn", 1, True), "F8_E5M2": ("float8_e5m2", 1, True),
    "I64": ("int64", 8, False), "I32": ("int32", 4, False), "I16": ("int16", 2, False), "I8": ("int8", 1, False),
    "U8": ("uint8", 1, False), "BOOL": ("bool", 1, False),
}
NAMES = tuple(_TABLE)
ITEMSIZE = {k: v[1] for k, v in _TABLE.items()}
FLOATING = frozenset(k for k, v in _TABLE.items() if v[2])
_BY_TEXT = {v[0]: k for k, v in _TABLE.items()}  # str(torch dtype) and str(numpy dtype) minus "torch."
NUMPY = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1",
         "BOOL": "?"}  # numpy has no bfloat16 or float8


def name_of(dtype: Any) -> str:
    """The safetensors name of a torch or numpy dtype (KeyError for one safetensors cannot store)."""
    return _BY_TEXT[str(dtype).removeprefix("torch.")]


def st_name(src: Any) -> str:
    """The safetensors name of any tensor-like: a lazy tensor or a lazy stack (their `st`), or an
    object with a torch or numpy `dtype`."""
    st = getattr(src, "st", None)
    return st if st is not None else name_of(src.dtype)


TORCH_TEXT = {k: "torch." + v[0] for k, v in _TABLE.items()}  # what fingerprints and records hash


def text(src: Any) -> str:
    """The dtype as torch prints it ("torch.bfloat16"): what fingerprints and expert records hash."""
    return TORCH_TEXT[st_name(src)]


def nbytes(src: Any) -> int:
    """Bytes of a tensor-like's C-order data."""
    return math.prod(src.shape) * ITEMSIZE[st_name(src)]


def torch_dtype(name: str):
    """torch's dtype for a safetensors name (imports torch)."""
    import torch

    return getattr(torch, _TABLE[name][0])


# The bits of each float dtype's exponent: all set means Inf or NaN (float8 e4m3fn: the NaN pattern).
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00),
             "BF16": ("<u2", 0x7F80), "F8_E4M3": ("u1", 0x7F), "F8_E5M2": ("u1", 0x7C)}
_SUMMABLE = {"F64", "F32", "F16"}  # checked by a sum first: one pass, no temporary


def nonfinite(data, name: str) -> bool:
    """Whether the little-endian values of dtype `name` in `data` (whole elements) hold NaN or Inf."""
    if name not in _EXPONENT:
        return False
    import numpy as np

    if name in _SUMMABLE:
        values = np.frombuffer(data, dtype=NUMPY[name])
        with np.errstate(over="ignore", invalid="ignore"):
            # A sum is finite only if every value is (or it overflowed: then look at each value).
            return not np.isfinite(values.sum()) and not bool(np.isfinite(values).all())
    kind, mask = _EXPONENT[name]
    bits = np.frombuffer(data, dtype=kind)
    return bool(((bits & mask) == mask).any())


def float32_array(data, name: str, shape):
    """Values of dtype `name` in `data` as a float32 numpy array of `shape`: what torch's `.float()`
    gives (bfloat16 and float16 widen exactly; float64 rounds to nearest). Float8 goes through torch."""
    import numpy as np

    if name == "BF16":  # the upper half of a float32
        values = (np.frombuffer(data, dtype="<u2").astype("<u4") << 16).view("<f4")
    elif name in ("F32", "F16", "F64"):
        with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf, as in torch
            values = np.frombuffer(data, dtype=NUMPY[name]).astype(np.float32)
    elif name in FLOATING:
        import torch

        values = torch.frombuffer(bytearray(data), dtype=torch_dtype(name)).float().numpy() if len(data) else \
            np.zeros(0, np.float32)
    else:
        raise ValueError(f"{name} is not a floating-point dtype")
    return values.reshape(shape)
