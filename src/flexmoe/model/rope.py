"""Rotary position embeddings (the half-split convention HF OLMo-2 uses)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """Caches cos/sin tables `[S, head_dim]` in fp32 and grows them on demand."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        need = offset + seq_len
        if self._cache is None or self._cache[0].shape[0] < need or self._cache[0].device != device:
            pos = torch.arange(max(need, 256), device=device, dtype=torch.float)
            freqs = pos[:, None] * self.inv_freq.to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cache = (emb.cos(), emb.sin())
        cos, sin = self._cache
        return cos[offset:need], sin[offset:need]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys laid out `[B, H, S, d]`."""
    dtype = x_BHSd.dtype
    out = x_BHSd * cos_Sd.to(dtype) + _rotate_half(x_BHSd) * sin_Sd.to(dtype)
    return out.to(dtype)
