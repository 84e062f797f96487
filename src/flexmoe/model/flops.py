"""FLOPs per token, counted from the config: active parameters only, and no weight-gradient
FLOPs for frozen weights (the anchor, attention, embeddings when branching)."""

from __future__ import annotations

from dataclasses import dataclass

from flexmoe.config.model import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token: top_k experts, not all of them


def param_counts(cfg: ModelConfig, num_experts: int | None = None, top_k: int | None = None) -> ParamCounts:
    """Parameter counts (including embeddings and head) from shapes alone; no model is built."""
    E = cfg.num_experts if num_experts is None else num_experts
    k = cfg.top_k if top_k is None else top_k
    D, Fd, L, hd = cfg.d_model, cfg.d_ff, cfg.num_layers, cfg.dim_head
    q, kv = cfg.num_heads * hd, cfg.kv_heads * hd
    attn = D * q + 2 * D * kv + q * D + q + kv  # projections + q/k norms
    norms = 2 * D
    expert = 3 * D * Fd
    if E == 0:
        ffn_total = ffn_active = expert
    else:
        router = E * D + (E if cfg.router_bias else 0)
        ffn_total, ffn_active = E * expert + router, min(k, E) * expert + router
    emb = 2 * cfg.vocab_size * D + D  # embedding + untied head + final norm
    return ParamCounts(total=L * (attn + norms + ffn_total) + emb, active=L * (attn + norms + ffn_active) + emb)


def flops_per_token(
    cfg: ModelConfig, seq_len: int, *, training: bool = True, trainable_expert_fraction: float | None = None,
    shared_trainable: bool = True,
) -> float:
    """Matmul FLOPs per token of one forward (and backward when training).

    Forward: 2 x active matmul params + attention scores. Backward: 2x for activation gradients
    everywhere, plus 2x weight-gradient FLOPs only where weights train. With the shared layers
    frozen (`shared_trainable=False`), only `trainable_expert_fraction` of the active expert
    FLOPs (e.g. 1/top_k for one trainable expert of two) get weight gradients.
    """
    D, Fd, L = cfg.d_model, cfg.d_ff, cfg.num_layers
    q, kv = cfg.num_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    attn_mm = D * q + 2 * D * kv + q * D
    k = min(cfg.top_k, cfg.num_experts) if cfg.is_moe else 1
    expert_mm = k * 3 * D * Fd
    router_mm = cfg.num_experts * D if cfg.is_moe else 0
    head_mm = cfg.vocab_size * D
    # causal attention: QK^T and AV, each 2*S*q per token, halved by the mask
    attn_scores = 2 * 2 * seq_len * q / 2
    fwd_mm = L * (attn_mm + expert_mm + router_mm) + head_mm
    fwd = 2 * fwd_mm + L * attn_scores
    if not training:
        return float(fwd)
    act_grad = fwd  # gradients w.r.t. activations flow through every layer
    if shared_trainable:
        wgrad = 2 * fwd_mm
    else:
        frac = 1.0 if trainable_expert_fraction is None else trainable_expert_fraction
        wgrad = 2 * L * (expert_mm * frac + router_mm)
    return float(fwd + act_grad + wgrad)
