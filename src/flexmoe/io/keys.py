"""The parameter-name schema: every native tensor name, its Hugging Face counterpart and its shape.

One table of templates with `[layer]` and `[expert]` placeholders serves both directions of HF
conversion, and the helpers below name native tensors for branch, merge, package, consent, release
and the baselines, so no other module types a parameter name out.
"""

from __future__ import annotations

import re

from flexmoe.config.model import NATIVE_BUFFERS, ModelConfig

# The SwiGLU weights of an FFN, dense or per expert.
EXPERT_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


# --- native names (model directories, state dicts) -----------------------------------------------
def dense_ffn_key(layer: int, weight: str) -> str:
    """A dense model's FFN weight (`weight` in EXPERT_WEIGHTS)."""
    return f"layers.{layer}.ffn.{weight}.weight"


def experts_key(layer: int, weight: str) -> str:
    """An MoE layer's stacked `[E, ...]` expert weight."""
    return f"layers.{layer}.ffn.experts.{weight}"


def router_weight_key(layer: int) -> str:
    """An MoE layer's router `[E, d_model]`."""
    return f"layers.{layer}.ffn.router.weight"


def router_bias_key(layer: int) -> str:
    """An MoE layer's optional per-expert router bias `[E]`."""
    return f"layers.{layer}.ffn.router.bias"


_EXPERTS = re.compile(r"^layers\.(\d+)\.ffn\.experts\.(gate_proj|up_proj|down_proj)$")


def parse_experts_key(key: str) -> tuple[int, str] | None:
    """(layer, weight) of a stacked expert key, else None."""
    m = _EXPERTS.match(key)
    return (int(m.group(1)), m.group(2)) if m else None


PER_EXPERT_KEY = re.compile(
    r"^(layers\.\d+\.ffn\.(experts\.(gate_proj|up_proj|down_proj)|router\.weight|router\.bias)|domain_centroids|domain_ngrams)$")


def is_per_expert_key(key: str) -> bool:
    """True for native tensors with one slice per expert slot (experts, routers, routing buffers)."""
    return bool(PER_EXPERT_KEY.match(key))


HF_FUSED_KEY = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def parse_hf_fused_key(key: str) -> tuple[str, str] | None:
    """(experts prefix, `gate_up_proj`|`down_proj`) of a transformers-5 fused expert key, else None."""
    m = HF_FUSED_KEY.match(key)
    return (m.group(1), m.group(2)) if m else None


def is_router_key(key: str) -> bool:
    """True for router weights and biases."""
    return ".ffn.router." in key


def is_shared_key(key: str) -> bool:
    """True for tensors outside the FFN experts and routers (attention, norms, embeddings, head)."""
    return ".ffn." not in key


SHARED_PREFIX = "shared."  # a package's copy of a shared tensor it trained (BAR stages)


# --- storage order: how tensors are laid out in the files flexmoe writes -----------------------------
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
# Per layer, what `expert_tensor_sha256` reads, in its order: the expert weights, then the router row
# (native MoE names and package names alike); the router bias follows.
_RECORD_RANK = {**{f"ffn.experts.{w}": i for i, w in enumerate(EXPERT_WEIGHTS)}, **{w: i for i, w in enumerate(EXPERT_WEIGHTS)},
                "ffn.router.weight": 3, "router": 3, "ffn.router.bias": 4, "bias": 4}


def storage_rank(key: str) -> tuple:
    """Sort key of the order MoE models and packages are written in: keys outside layers by name
    (before `layers.` or after it), layers by number, and in a layer everything else by name, then
    gate, up, down, router row, bias, the order a slot's tensor_sha256 reads them. A package's
    `shared.NAME` copy sits where NAME does. So merge and remove-expert read their inputs front to
    back, which lets one pass both verify an input file's sha256 and hash every output slot."""
    name = key[len(SHARED_PREFIX):] if key.startswith(SHARED_PREFIX) else key
    m = _LAYER_KEY.match(name)
    if m is None:
        return (0 if name < "layers." else 2, 0, 0, 0, name, key)
    rank = _RECORD_RANK.get(m.group(2))
    return (1, int(m.group(1)), 0 if rank is None else 1, rank or 0, m.group(2), key)


def storage_order(keys, moe: bool) -> list[str]:
    """The order tensors are written in: dense models by name (the fingerprint's order, so one read
    both hashes the file and fingerprints it), MoE models and packages by `storage_rank`."""
    return sorted(keys, key=storage_rank) if moe else sorted(keys)


# Name patterns (fnmatch) of the parameter groups freeze plans refer to.
EMBEDDING_GLOBS = ("embed.*", "lm_head.*")
NORM_GLOBS = ("norm.*", "layers.*.attn_norm.*", "layers.*.ffn_norm.*")
ATTENTION_GLOBS = ("layers.*.attn.*",)
EXPERTS_GLOB = "layers.*.ffn.experts.*"


def param_group(name: str) -> str:
    """The group a native parameter belongs to, for summaries: experts, router, ffn (a dense FFN),
    attention, embeddings or norms."""
    if ".ffn.experts." in name:
        return "experts"
    if ".ffn.router." in name:
        return "router"
    if ".ffn." in name:
        return "ffn"
    if ".attn." in name:
        return "attention"
    if name.startswith(("embed", "lm_head")):
        return "embeddings"
    return "norms"


# --- expert package names (one expert's slice of every layer) ------------------------------------
def package_weight_key(layer: int, weight: str) -> str:
    """One expert's FFN weight in a package's expert.safetensors."""
    return f"layers.{layer}.{weight}"


def package_router_key(layer: int) -> str:
    """One expert's router row in a package."""
    return f"layers.{layer}.router"


def package_layer_of(key: str) -> int | None:
    """The layer index of a package tensor key (`layers.{i}.*`), else None."""
    parts = key.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def package_bias_key(layer: int) -> str:
    """One expert's router bias `[1]` in a package."""
    return f"layers.{layer}.bias"


def hf_experts_prefix(layer: int) -> str:
    """The prefix of a Hugging Face FlexOlmo layer's experts (`.{j}.gate_proj.weight`, fused forms)."""
    return f"model.layers.{layer}.mlp.experts"


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
        out.update({router_bias_key(i): (cfg.num_experts,) for i in range(cfg.num_layers)})
    if cfg.is_moe:
        out["domain_centroids"] = (cfg.num_experts, cfg.d_model)
        if cfg.doc_ngram_buckets > 0:
            out["domain_ngrams"] = (cfg.num_experts, cfg.doc_ngram_buckets)
    return out


# The n-gram profiles `[E, buckets]` in a document-routing Hugging Face release (export-hf of an
# anchor_ngram merge): the buffer `profiles` of the release's `doc_router` module
# (convert/remote/modeling_flexmoe_doc.py), native `domain_ngrams`.
HF_DOC_PROFILES = "doc_router.profiles"
