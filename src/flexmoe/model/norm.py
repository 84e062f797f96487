"""RMSNorm matching OLMo-2 / HF FlexOlmo: statistics in fp32, weight applied in fp32, cast back."""

from __future__ import annotations

import torch
from torch import nn

try:  # apex's fused kernel is a CUDA-only fast path; the torch code below is the reference.
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm  # type: ignore
except Exception:  # pragma: no cover - apex is absent on CPU machines
    _ApexRMSNorm = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, impl: str = "auto"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.use_apex = _ApexRMSNorm is not None and impl in ("auto", "apex")
        if impl == "apex" and _ApexRMSNorm is None:
            raise ValueError("model.norm_impl=apex but apex is not importable; use model.norm_impl=auto")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_apex and x.is_cuda:  # pragma: no cover - GPU only
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine  # type: ignore

            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(dtype)
