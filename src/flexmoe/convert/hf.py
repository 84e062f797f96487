"""Native <-> Hugging Face key mapping as one table of templates, used in both directions.

Native experts are stacked `[E, ...]`; on disk HF FlexOlmo stores one tensor per expert
(`mlp.experts.{j}.gate_proj.weight`), while transformers 5 fuses them in memory into
`mlp.experts.gate_up_proj [E, 2F, D]`. Import accepts both; export writes the per-expert form,
which every published FlexOlmo checkpoint and vLLM use.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from flexmoe.config.model import NATIVE_BUFFERS, ModelConfig

# (native template, HF template, kind); [layer] and [expert] are placeholders.
KEY_TABLE: list[tuple[str, str, str]] = [
    ("embed.weight", "model.embed_tokens.weight", "all"),
    ("norm.weight", "model.norm.weight", "all"),
    ("lm_head.weight", "lm_head.weight", "all"),
    ("layers.[layer].attn.q_proj.weight", "model.layers.[layer].self_attn.q_proj.weight", "all"),
    ("layers.[layer].attn.k_proj.weight", "model.layers.[layer].self_attn.k_proj.weight", "all"),
    ("layers.[layer].attn.v_proj.weight", "model.layers.[layer].self_attn.v_proj.weight", "all"),
    ("layers.[layer].attn.o_proj.weight", "model.layers.[layer].self_attn.o_proj.weight", "all"),
    ("layers.[layer].attn.q_norm.weight", "model.layers.[layer].self_attn.q_norm.weight", "all"),
    ("layers.[layer].attn.k_norm.weight", "model.layers.[layer].self_attn.k_norm.weight", "all"),
    ("layers.[layer].attn_norm.weight", "model.layers.[layer].post_attention_layernorm.weight", "all"),
    ("layers.[layer].ffn_norm.weight", "model.layers.[layer].post_feedforward_layernorm.weight", "all"),
    ("layers.[layer].ffn.gate_proj.weight", "model.layers.[layer].mlp.gate_proj.weight", "dense"),
    ("layers.[layer].ffn.up_proj.weight", "model.layers.[layer].mlp.up_proj.weight", "dense"),
    ("layers.[layer].ffn.down_proj.weight", "model.layers.[layer].mlp.down_proj.weight", "dense"),
    ("layers.[layer].ffn.router.weight", "model.layers.[layer].mlp.gate.weight", "moe"),
    ("layers.[layer].ffn.experts.gate_proj[expert]", "model.layers.[layer].mlp.experts.[expert].gate_proj.weight", "moe"),
    ("layers.[layer].ffn.experts.up_proj[expert]", "model.layers.[layer].mlp.experts.[expert].up_proj.weight", "moe"),
    ("layers.[layer].ffn.experts.down_proj[expert]", "model.layers.[layer].mlp.experts.[expert].down_proj.weight", "moe"),
]


def _fill(template: str, layer: int | None = None, expert: int | None = None) -> str:
    s = template.replace("[layer]", str(layer)) if layer is not None else template
    return s.replace("[expert]", str(expert)) if expert is not None else s


def key_pairs(cfg: ModelConfig) -> list[tuple[str, int | None, str]]:
    """Every (native key, expert slot or None, HF key) of a model with this config, in order."""
    kind = "moe" if cfg.is_moe else "dense"
    out: list[tuple[str, int | None, str]] = []
    for native, hf, k in KEY_TABLE:
        if k not in ("all", kind):
            continue
        layers = range(cfg.num_layers) if "[layer]" in native else [None]
        for i in layers:
            if "[expert]" in native:
                base = _fill(native.replace("[expert]", ""), i)
                out += [(base, j, _fill(hf, i, j)) for j in range(cfg.num_experts)]
            else:
                out.append((_fill(native, i), None, _fill(hf, i)))
    return out


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


_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


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
        p = f"model.layers.{i}.mlp.experts"
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


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """`config.json` of an Olmo2 or FlexOlmo checkpoint -> ModelConfig; other architectures refused."""
    arch = (hf.get("architectures") or [None])[0]
    if arch not in ("Olmo2ForCausalLM", "FlexOlmoForCausalLM"):
        raise ValueError(f"{source}: architecture {arch!r} is not supported (Olmo2ForCausalLM, FlexOlmoForCausalLM)")
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"{source}: only default RoPE is supported, got {rope or hf.get('rope_scaling')}")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    moe = arch == "FlexOlmoForCausalLM"
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
        num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim if head_dim and head_dim != hf["hidden_size"] // heads else None,
        d_ff=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 4096),
        rope_theta=float(theta), norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        num_experts=hf.get("num_experts", 0) if moe else 0,
        top_k=hf.get("num_experts_per_tok", 2) if moe else 2,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        pad_token_id=hf.get("pad_token_id"),
        eos_token_id=hf.get("eos_token_id") if isinstance(hf.get("eos_token_id"), int) else None,
    )


def hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF on-disk (per-expert) tensor of a model with this config, in key_pairs order."""
    D, F, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.dim_head, cfg.kv_heads * cfg.dim_head
    by_suffix = {
        "embed_tokens.weight": (V, D), "lm_head.weight": (V, D), "model.norm.weight": (D,),
        "q_proj.weight": (q, D), "k_proj.weight": (kv, D), "v_proj.weight": (kv, D), "o_proj.weight": (D, q),
        "q_norm.weight": (q,), "k_norm.weight": (kv,), "layernorm.weight": (D,),
        "gate_proj.weight": (F, D), "up_proj.weight": (F, D), "down_proj.weight": (D, F),
        "mlp.gate.weight": (cfg.num_experts, D),
    }
    out = {}
    for _, _, hf in key_pairs(cfg):
        out[hf] = next(shape for suffix, shape in by_suffix.items() if hf.endswith(suffix))
    return out


# Native MoE tensors with no Hugging Face counterpart, which a native model may lack (loaded as zeros):
# document routing's per-expert centroids and n-gram profiles. Export leaves them out (keeping them
# beside the HF files, convert/extras.py); top-k routing never reads them.
NATIVE_ONLY = NATIVE_BUFFERS


def native_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every native (canonical, stacked `[E, ...]`) tensor: router bias when configured, and
    the NATIVE_ONLY tensors of an MoE."""
    hf = hf_shapes(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for nat, slot, key in key_pairs(cfg):
        out[nat] = hf[key] if slot is None else (cfg.num_experts,) + hf[key]
    if cfg.is_moe and cfg.router_bias:
        out.update({f"layers.{i}.ffn.router.bias": (cfg.num_experts,) for i in range(cfg.num_layers)})
    if cfg.is_moe:
        out["domain_centroids"] = (cfg.num_experts, cfg.d_model)
        if cfg.doc_ngram_buckets > 0:
            out["domain_ngrams"] = (cfg.num_experts, cfg.doc_ngram_buckets)
    return out
