"""AdamW over trainable parameters only, with no decay on norms, embeddings and routers."""

from __future__ import annotations

import math

import torch
from torch import nn

from flexmoe.config.train import OptimConfig

_NO_DECAY = ("norm.weight", "embed.", "router.", ".bias")


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Frozen parameters get no optimizer state at all: they are not handed to the optimizer."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if any(s in name for s in _NO_DECAY) else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("no trainable parameters: check stage.freeze")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    params = [p for g in groups for p in g["params"]]
    impl = choose_impl(params, cfg.impl, _apex_fused_adam() is not None)
    if impl == "apex":  # pragma: no cover - needs apex and a GPU
        return _apex_fused_adam()(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **({"fused": True} if impl == "fused" else {"foreach": True}), **kwargs)


IMPLS = ("auto", "torch", "apex")


def choose_impl(params: list[torch.Tensor], requested: str, apex_available: bool) -> str:
    """'fused' (torch AdamW's CUDA kernel), 'foreach' or 'apex', for these parameters.

    apex's FusedAdam hands raw data pointers to its multi-tensor kernels, which FSDP2/TP parameters
    (DTensors: local shards behind a wrapper) do not have, so it is refused on them; torch's fused
    and foreach paths both take DTensors."""
    from torch.distributed.tensor import DTensor

    if requested not in IMPLS:
        raise ValueError(f"optim.impl={requested!r}: choose one of {', '.join(IMPLS)}")
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    if requested == "apex":
        if not apex_available:
            raise ValueError("optim.impl=apex: apex is not installed (its CUDA build); use optim.impl=auto")
        if any(isinstance(p, DTensor) for p in params):
            raise ValueError("optim.impl=apex: the parameters are DTensors (FSDP2/tensor parallel) and apex's FusedAdam "
                             "works on plain tensors only; use optim.impl=auto (torch's fused AdamW)")
        if not on_cuda:
            raise ValueError("optim.impl=apex: apex's FusedAdam runs on CUDA tensors only; use optim.impl=auto")
        return "apex"
    return "fused" if requested == "auto" and on_cuda else "foreach"


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # type: ignore
    except Exception:  # noqa: BLE001  (not installed, or built without its CUDA extension)
        return None
    return FusedAdam


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio * lr` (step counts from 0)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
