"""Causal self-attention with q/k RMSNorm over the full projected width (OLMo-2), RoPE and GQA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.config.model import ModelConfig
from flexmoe.model.linear import Linear
from flexmoe.model.norm import RMSNorm
from flexmoe.model.rope import apply_rope

try:  # flash-attn builds only with CUDA: an optional fast path, SDPA is the fallback.
    from flash_attn import flash_attn_func as _flash_attn_func  # type: ignore
except Exception:  # pragma: no cover - absent on CPU machines
    _flash_attn_func = None


def flash_attn_available() -> bool:
    return _flash_attn_func is not None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads, cfg.dim_head
        q_dim, kv_dim = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.q_proj = Linear(cfg.d_model, q_dim, bias=False)
        self.k_proj = Linear(cfg.d_model, kv_dim, bias=False)
        self.v_proj = Linear(cfg.d_model, kv_dim, bias=False)
        self.o_proj = Linear(q_dim, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(q_dim, cfg.norm_eps, cfg.norm_impl)
        self.k_norm = RMSNorm(kv_dim, cfg.norm_eps, cfg.norm_impl)
        if cfg.attn_impl == "flash" and _flash_attn_func is None:
            raise ValueError("model.attn_impl=flash but flash_attn is not importable; use model.attn_impl=auto")
        self.impl = cfg.attn_impl

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                doc_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """`doc_ids_BS` (packed examples): attention stays inside each example (document masking)."""
        B, S, _ = x_BSD.shape
        q = self.q_norm(self.q_proj(x_BSD)).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_norm(self.k_proj(x_BSD)).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        use_flash = (
            doc_ids_BS is None and _flash_attn_func is not None and x_BSD.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and self.impl in ("auto", "flash")
        )
        if use_flash:  # pragma: no cover - GPU only
            o = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            o_BSq = o.reshape(B, S, -1)
        else:
            if self.num_kv_heads != self.num_heads:
                rep = self.num_heads // self.num_kv_heads
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            allowed = None
            if doc_ids_BS is not None:
                causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
                allowed = (doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]) & causal  # [B, S, S]
                allowed = allowed[:, None]
            if self.impl == "eager":
                scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
                if allowed is None:
                    allowed = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
                p = scores.masked_fill(~allowed, float("-inf")).softmax(-1, dtype=torch.float32).to(q.dtype)
                o = p @ v
            elif allowed is not None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o_BSq = o.transpose(1, 2).reshape(B, S, -1)
        return self.o_proj(o_BSq)
