"""Native <-> Hugging Face key mapping as one table of templates, used in both directions.

Native experts are stacked `[E, ...]`; on disk HF FlexOlmo stores one tensor per expert
(`mlp.experts.{j}.gate_proj.weight`), while transformers 5 fuses them in memory into
`mlp.experts.gate_up_proj [E, 2F, D]`. Import accepts both; export writes the per-expert form,
which every published FlexOlmo checkpoint and vLLM use.
"""

from __future__ import annotations

from typing import Any

import torch

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import HF_FUSED_KEY as _FUSED, hf_experts_prefix, key_pairs

def native_to_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Native (canonical, `[E, ...]`) state dict -> HF on-disk per-expert state dict."""
    if cfg.router_bias and any(k.endswith("router.bias") and bool(v.ne(0).any()) for k, v in sd.items()):
        raise ValueError("the model has non-zero router biases, which HF FlexOlmo cannot represent; "
                         "fold or drop them before export (model.router_bias)")
    return {hf: (sd[nat] if slot is None else sd[nat][slot]).contiguous() for nat, slot, hf in key_pairs(cfg)}


def hf_to_native(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict (per-expert on-disk form, or transformers-5 fused in-memory form) -> native."""
    sd = unfuse_experts(sd)
    out: dict[str, torch.Tensor] = {}
    stacks: dict[str, list[torch.Tensor]] = {}
    for nat, slot, hf in key_pairs(cfg):
        if hf not in sd:
            raise KeyError(hf)
        if slot is None:
            out[nat] = sd[hf]
        else:
            stacks.setdefault(nat, []).append(sd[hf])
    out.update({k: torch.stack(v) for k, v in stacks.items()})
    return out




def unfuse_experts(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split transformers-5 fused expert tensors into per-expert keys (no-op otherwise)."""
    if not any(_FUSED.match(k) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        m = _FUSED.match(k)
        if not m:
            out[k] = v
            continue
        prefix, kind = m.groups()
        for j in range(v.shape[0]):
            if kind == "gate_up_proj":
                gate, up = v[j].chunk(2, dim=0)
                out[f"{prefix}.{j}.gate_proj.weight"], out[f"{prefix}.{j}.up_proj.weight"] = gate, up
            else:
                out[f"{prefix}.{j}.down_proj.weight"] = v[j]
    return out


def fuse_experts(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Per-expert HF keys -> transformers-5 fused in-memory keys (for `load_state_dict` on an HF model)."""
    out = {k: v for k, v in sd.items() if ".mlp.experts." not in k}
    for i in range(cfg.num_layers if cfg.is_moe else 0):
        p = hf_experts_prefix(i)
        out[f"{p}.gate_up_proj"] = torch.stack(
            [torch.cat([sd[f"{p}.{j}.gate_proj.weight"], sd[f"{p}.{j}.up_proj.weight"]]) for j in range(cfg.num_experts)])
        out[f"{p}.down_proj"] = torch.stack([sd[f"{p}.{j}.down_proj.weight"] for j in range(cfg.num_experts)])
    return out


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """`config.json` for `FlexOlmoForCausalLM` (MoE) or `Olmo2ForCausalLM` (dense)."""
    common = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.kv_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "initializer_range": cfg.init_std, "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "pad_token_id": cfg.pad_token_id, "eos_token_id": cfg.eos_token_id, "bos_token_id": None,
        "torch_dtype": torch_dtype, "use_cache": True,
    }
    if cfg.head_dim is not None and cfg.head_dim != cfg.d_model // cfg.num_heads:
        common["head_dim"] = cfg.head_dim
    if not cfg.is_moe:
        return {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2", **common}
    return {
        "architectures": ["FlexOlmoForCausalLM"], "model_type": "flex_olmo", **common,
        "num_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": cfg.norm_topk_prob, "router_aux_loss_coef": cfg.lb_loss_weight,
        "output_router_logits": False,
    }
