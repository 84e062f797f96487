"""The model's shape and MoE settings: one dataclass, JSON- and Hydra-friendly."""

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional


# Routing policies (see ModelConfig.routing); only topk is expressible in Hugging Face FlexOlmo.
ROUTINGS = ("topk", "anchor_top1", "anchor_doc", "anchor_ngram")
# MoE buffers of document routing (per expert, dim 0) with no Hugging Face counterpart: a
# checkpoint may lack them (loaded as zeros); top-k routing never reads them.
NATIVE_BUFFERS = ("domain_centroids", "domain_ngrams")
# Fields added after the first release whose default means "feature off". `save` leaves them out
# at their default, so an older flexmoe (which refuses keys it does not know) still reads every
# model that does not use the feature. Their defaults must never change meaning.
FEATURE_DEFAULTS = {"routing": "topk", "doc_ngram_buckets": 0, "router_cosine_temp": 0.0}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class ModelConfig:
    """Shape of an OLMo-2 / FlexOlmo decoder.

    `num_experts == 0` builds a dense SwiGLU FFN; `num_experts >= 1` builds the MoE FFN with
    experts stacked `[E, ...]`.
    """

    vocab_size: int = 258
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: Optional[int] = None  # None: same as num_heads (no GQA)
    head_dim: Optional[int] = None  # None: d_model // num_heads
    d_ff: int = 512
    max_seq_len: int = 4096
    rope_theta: float = 500000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # MoE
    num_experts: int = 0
    top_k: int = 2
    norm_topk_prob: bool = False
    router_bias: bool = False  # FlexOlmo's per-expert non-positive bias (held at 0 for expert 0)
    # topk: plain token-choice top-k over all experts. anchor_top1: the anchor (expert 0) always,
    # plus the best domain expert by router logit. anchor_doc: the anchor plus the domain expert
    # whose centroid is nearest the causal running mean of the document's layer-0 FFN input (no
    # expert when the public centroid is nearest). Both anchor_* policies weigh the pair by a 2-way
    # softmax, which is exactly what the owner's own 2-expert model computes. anchor_ngram: like
    # anchor_doc, but the domain expert is the one whose n-gram profile (model/docroute.py) best
    # explains the window's tokens so far.
    routing: str = "topk"
    doc_ngram_buckets: int = 0  # > 0: the model carries per-expert n-gram profiles (`domain_ngrams`)
    router_cosine_temp: float = 0.0  # > 0: router logits are cos(x, row) / temperature (a merge setting)
    lb_loss_weight: float = 0.0
    z_loss_weight: float = 0.0
    # Implementation choices ("auto" picks the fast path that is importable).
    attn_impl: str = "auto"  # auto | sdpa | flash | eager
    moe_impl: str = "auto"  # auto | grouped | loop
    norm_impl: str = "auto"  # auto | torch | apex
    pad_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # --- derived -----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def validate(self) -> None:
        """Refuse impossible shapes with an error naming the setting."""
        self._validate_types()
        checks = [
            (self.num_heads > 0, "model.num_heads must be positive"),
            (self.head_dim is not None or self.d_model % self.num_heads == 0,
             f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; set model.head_dim"),
            (self.num_heads % self.kv_heads == 0,
             f"model.num_heads={self.num_heads} is not divisible by model.num_kv_heads={self.kv_heads}"),
            (self.dim_head % 2 == 0, f"head dim {self.dim_head} must be even for RoPE"),
            (self.num_experts >= 0, "model.num_experts must be >= 0"),
            (self.num_experts == 0 or 1 <= self.top_k <= self.num_experts,
             f"model.top_k={self.top_k} must be between 1 and model.num_experts={self.num_experts}"),
            (self.routing in ROUTINGS, f"model.routing={self.routing!r} is not {'|'.join(ROUTINGS)}"),
            (self.router_cosine_temp >= 0, f"model.router_cosine_temp={self.router_cosine_temp} must be >= 0 (0: off)"),
            (self.doc_ngram_buckets >= 0, f"model.doc_ngram_buckets={self.doc_ngram_buckets} must be >= 0"),
            (self.routing != "anchor_ngram" or self.doc_ngram_buckets > 0,
             "model.routing=anchor_ngram needs n-gram profiles (model.doc_ngram_buckets > 0): merge packages made "
             "from `flexmoe router-embed` output that carries them"),
            (self.attn_impl in ("auto", "sdpa", "flash", "eager"), f"model.attn_impl={self.attn_impl!r} is not auto|sdpa|flash|eager"),
            (self.moe_impl in ("auto", "grouped", "loop"), f"model.moe_impl={self.moe_impl!r} is not auto|grouped|loop"),
            (self.norm_impl in ("auto", "torch", "apex"), f"model.norm_impl={self.norm_impl!r} is not auto|torch|apex"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def _validate_types(self) -> None:
        """Types and ranges of single settings first: a size of -32, 1.5 or "64" is refused here,
        naming it, instead of failing inside torch (or dividing by zero in the checks below)."""
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"model.{name}={getattr(self, name)!r} must be {want}")

        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_seq_len"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in ("num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise bad(name, "a positive integer or null")
        for name in ("num_experts", "top_k", "doc_ngram_buckets"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "an integer >= 0")
        for name in ("rope_theta", "norm_eps"):
            if not _is_real(getattr(self, name)) or not getattr(self, name) > 0:
                raise bad(name, "a finite number > 0")
        for name in ("init_std", "router_cosine_temp", "lb_loss_weight", "z_loss_weight"):
            if not _is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise bad(name, "a finite number >= 0")
        for name in ("norm_topk_prob", "router_bias"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "true or false")
        for name in ("routing", "attn_impl", "moe_impl", "norm_impl"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        for name in ("pad_token_id", "eos_token_id"):
            v = getattr(self, name)
            if v is not None and not _is_int(v):
                raise bad(name, "null or an integer token id")
        if not isinstance(self.extra, dict):
            raise bad("extra", "an object")

    # --- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown} (written by a newer flexmoe? upgrade to read it); "
                             f"known: {sorted(names)}")
        return cls(**d)

    def replace(self, **kw: Any) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def save(self, path: str | Path) -> None:
        d = {k: v for k, v in self.to_dict().items() if k not in FEATURE_DEFAULTS or v != FEATURE_DEFAULTS[k]}
        Path(path).write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        p = Path(path)
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
            raise ValueError(f"{p}: not a valid flexmoe model config ({e})") from e
