"""Freeze plans: which parameters train in a stage (glob patterns plus row-level anchor freezing)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from flexmoe.io.keys import ATTENTION_GLOBS, EMBEDDING_GLOBS, EXPERTS_GLOB, NORM_GLOBS, param_group
from flexmoe.model.moe import MoE
from flexmoe.parallel.grad import ROW_MASK


@dataclass
class FreezePlan:
    """`frozen`: glob patterns over parameter names. `frozen_experts`: leading expert slots frozen
    (1 = the anchor). `frozen_router_rows`: leading router rows (and biases) frozen."""

    name: str = "none"
    frozen: list[str] = field(default_factory=list)
    frozen_experts: int = 0
    frozen_router_rows: int = 0
    train_router: bool = True


EMBEDDINGS, NORMS, ATTENTION = list(EMBEDDING_GLOBS), list(NORM_GLOBS), list(ATTENTION_GLOBS)
SHARED = EMBEDDINGS + NORMS + ATTENTION

PLANS = {
    "none": FreezePlan("none"),
    # FlexOlmo: everything shared and the anchor expert frozen; the owner's expert + router row train.
    "expert_anchor": FreezePlan("expert_anchor", list(SHARED), frozen_experts=1, frozen_router_rows=1),
    # Router tuning: only router rows (and biases) train.
    "router_tune": FreezePlan("router_tune", list(SHARED) + [EXPERTS_GLOB]),
    # BAR's progressive unfreezing. The anchor expert and the public router row stay frozen in
    # every stage: they are what keeps independently trained experts compatible.
    "midtrain": FreezePlan("midtrain", list(SHARED), frozen_experts=1, frozen_router_rows=1),
    "sft": FreezePlan("sft", NORMS + ATTENTION, frozen_experts=1, frozen_router_rows=1),
    "rl_unfrozen": FreezePlan("rl_unfrozen", [], frozen_experts=1, frozen_router_rows=1),
}


def apply_freeze_plan(model: nn.Module, plan: FreezePlan) -> dict[str, int]:
    """Set requires_grad per the plan and install row masks; returns trainable counts per group."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    for m in moes:
        m.experts.freeze_leading(plan.frozen_experts)
    for name, p in model.named_parameters():
        if name.endswith("_frozen"):
            continue
        p.requires_grad_(not any(fnmatch.fnmatchcase(name, pat) for pat in plan.frozen))
    for m in moes:
        for p in (m.router.weight, m.router.bias):
            if p is None:
                continue
            if not plan.train_router:
                p.requires_grad_(False)
            elif plan.frozen_router_rows and p.requires_grad:
                _mask_rows(p, plan.frozen_router_rows)
    return trainable_summary(model)


def _mask_rows(p: torch.Tensor, n: int) -> None:
    """Zero the gradient of the first n rows, so Adam never moves them (exp_avg stays 0)."""
    if getattr(p, ROW_MASK, None) == n:
        return
    keep = torch.ones(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype)
    keep[:n] = 0
    p.register_hook(lambda g, keep=keep: g * keep.to(g.device, g.dtype))
    setattr(p, ROW_MASK, n)


def restore_row_masks(model: nn.Module, masks: dict[str, int]) -> None:
    """Re-install row masks (by parameter name, from parallel.grad.row_masks) on parameters that a
    conversion such as `to_empty` replaced; parameters that kept theirs are left alone."""
    for name, p in model.named_parameters():
        if name in masks and getattr(p, ROW_MASK, 0) != masks[name]:
            _mask_rows(p, masks[name])


def trainable_summary(model: nn.Module) -> dict[str, int]:
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = param_group(name)
        rows = getattr(p, ROW_MASK, 0)
        groups[g] = groups.get(g, 0) + p.numel() - rows * (p.numel() // max(p.shape[0], 1))
    groups["total"] = sum(groups.values())
    return groups
