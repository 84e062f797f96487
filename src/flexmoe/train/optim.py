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
    try:  # apex's fused AdamW is a CUDA fast path; torch AdamW is the reference.
        from apex.optimizers import FusedAdam  # type: ignore

        if all(p.is_cuda for g in groups for p in g["params"]):  # pragma: no cover - GPU only
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
    except Exception:
        pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Linear warmup then cosine decay to `min_lr_ratio * lr` (step counts from 0)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
