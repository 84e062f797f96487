"""DeepSpeed ZeRO 1/2/3 as the alternative engine to FSDP2, around our own MoE layer.

Supported: data parallelism only (tp = ep = 1, no HSDP, no compile); mesh.resolve_dims refuses
the rest before any training starts. The optimizer is ours (AdamW over trainable parameters
only, so frozen parameters get no optimizer state and DeepSpeed reduces no gradient for them);
the learning-rate schedule is set by the trainer each step. Batch sizes, gradient accumulation
and clipping come from our config; a DeepSpeed JSON (`parallel.deepspeed_config`) may add
anything else (bucket sizes, overlap, offload), and may not contradict ours.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a RunConfig: its JSON (if any) + what our settings fix.

    A JSON written for the Hugging Face Trainer works as it is: `"auto"` values take ours (batch
    sizes, accumulation, clipping, bf16, bucket sizes from model.d_model), an `optimizer` block
    of type AdamW whose parameters are "auto" or equal optim.* is ours, and a `scheduler` block
    whose parameters are all "auto" is dropped (the trainer sets the schedule); anything else in
    them is refused naming the setting to use instead."""
    p = cfg.parallel
    base: dict[str, Any] = {}
    src = "the Hydra config"
    if p.deepspeed_config:
        src = f"parallel.deepspeed_config={p.deepspeed_config}"
        try:
            base = json.loads(Path(p.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{src}: not a readable DeepSpeed JSON ({e})") from e
        if not isinstance(base, dict):
            raise ValueError(f"{src}: expected a JSON object")
    _check_optimizer(base.pop("optimizer", None), cfg, src)
    _check_scheduler(base.pop("scheduler", None), src)
    json_stage = base.get("zero_optimization", {}).get("stage")
    json_stage = None if json_stage == "auto" else json_stage
    stage = p.zero_stage if p.zero_stage is not None else (json_stage if json_stage is not None else 2)
    if json_stage is not None and json_stage != stage:
        raise ValueError(f"parallel.zero_stage={p.zero_stage} contradicts zero_optimization.stage={json_stage} "
                         f"in {src}; set one of them")
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} from {src} is not 1, 2 or 3")
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.trainer.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.trainer.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in ours.items():
        if key in base and base[key] != "auto" and base[key] != value:
            raise ValueError(f"{src}: {key}={base[key]} but data.batch_size, trainer.grad_accum and optim.grad_clip "
                             f"give {value}; drop it from the JSON")
    zero = _resolve_zero_auto(dict(base.get("zero_optimization", {})), cfg.model.d_model)
    out = {**base, **ours, "zero_optimization": {**zero, "stage": stage}}
    # DeepSpeed's own bf16 mode stores every parameter in bf16, frozen ones included: a frozen
    # fp32 anchor (or the frozen rows of a router) would be rounded and could not stay
    # bit-identical. trainer.dtype=bf16 runs bf16 compute through autocast over fp32 masters
    # instead (as the fsdp engine does on one process), so DeepSpeed's bf16 stays off.
    if out.get("bf16", {}).get("enabled") is True and cfg.trainer.dtype != "bf16":
        raise ValueError(f"{src}: bf16.enabled=true but trainer.dtype={cfg.trainer.dtype}; set trainer.dtype=bf16 "
                         "(bf16 compute, fp32 masters) and bf16.enabled to auto")
    for key, off in (("bf16", ("auto", True)), ("fp16", ("auto",))):  # fp16=true is refused below
        block = out.get(key)
        if isinstance(block, dict) and block.get("enabled") in off:
            out[key] = {**block, "enabled": False}
    if out.get("fp16", {}).get("enabled") is True:
        raise ValueError(f"{src}: fp16.enabled=true is not supported; use trainer.dtype=bf16")
    out.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
    out.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs
    leftover = sorted(_auto_keys(out))
    if leftover:
        raise ValueError(f"{src}: no flexmoe setting resolves \"auto\" for {leftover[0]}; give it a value")
    return out


# HF Trainer's rule for ZeRO bucket sizes given as "auto", from the model's hidden size.
_ZERO_AUTO = {
    "reduce_bucket_size": lambda d: d * d,
    "stage3_prefetch_bucket_size": lambda d: int(0.9 * d * d),
    "stage3_param_persistence_threshold": lambda d: 10 * d,
}


def _resolve_zero_auto(zero: dict[str, Any], d_model: int) -> dict[str, Any]:
    for key, rule in _ZERO_AUTO.items():
        if zero.get(key) == "auto":
            zero[key] = rule(d_model)
    return zero


def _auto_keys(d: Any, prefix: str = "") -> list[str]:
    if isinstance(d, dict):
        return [k for key, v in d.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if d == "auto" else []


def _check_optimizer(block: Any, cfg: Any, src: str) -> None:
    """An HF-style optimizer block: AdamW with "auto" (or our own) values is ours; else refused."""
    if block is None:
        return
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in ("AdamW", "adamw"):
        raise ValueError(f"{src}: optimizer.type={kind!r}: flexmoe trains with torch AdamW set by optim.*; "
                         "remove 'optimizer' from the JSON or give type AdamW")
    o = cfg.optim
    ours = {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay}
    for key, value in (block.get("params") or {}).items():
        if key not in ours:
            raise ValueError(f"{src}: optimizer.params.{key} has no flexmoe setting; remove it")
        if value != "auto" and (list(value) if isinstance(value, (list, tuple)) else value) != ours[key]:
            setting = {"lr": "optim.lr", "betas": "optim.beta1/optim.beta2", "eps": "optim.eps",
                       "weight_decay": "optim.weight_decay"}[key]
            raise ValueError(f"{src}: optimizer.params.{key}={value} differs from {setting}={ours[key]}; "
                             f"set {setting} (or \"auto\") instead")


def _check_scheduler(block: Any, src: str) -> None:
    """A scheduler block is dropped when every parameter is "auto" (the trainer sets the schedule)."""
    if block is None:
        return
    params = block.get("params", {}) if isinstance(block, dict) else None
    if not isinstance(params, dict) or any(v != "auto" for v in params.values()):
        raise ValueError(f"{src}: remove 'scheduler': flexmoe sets the learning-rate schedule from optim.* "
                         "(warmup_steps, min_lr_ratio)")


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap model and optimizer in a DeepSpeed engine (the process group must already exist)."""
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError("parallel.engine=deepspeed but deepspeed is not installed: "
                         "pip install -e '.[deepspeed]'") from e
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks on first use (minutes on a
        # small machine, under a file lock); the gloo group we already made does the job.
        # (importlib: `deepspeed.comm.torch` as an attribute is the torch package itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def whole(t: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """`t` whole: a ZeRO-3 partitioned parameter is gathered (a collective: every rank calls it, and
    only ranks with `keep` get the tensor back, detached, on its device); anything else is itself."""
    if not hasattr(t, "ds_id"):
        return t.detach() if keep else None
    import deepspeed

    with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
        return t.detach().clone() if keep else None
