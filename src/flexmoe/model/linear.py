"""A Linear whose weight follows its input's dtype: frozen weights kept in their stored dtype (a
bf16 public model stays bf16) compute with fp32 activations exactly as an fp32 copy would."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def as_compute(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`w` cast to `x`'s dtype, unless they agree or autocast picks the GEMM's dtype itself."""
    if w.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
        return w
    return w.to(x.dtype)


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and tensor-parallel styles) with `as_compute` weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.bias is None else as_compute(self.bias, x)
        return F.linear(x, as_compute(self.weight, x), bias)
