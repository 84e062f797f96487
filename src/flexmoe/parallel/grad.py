"""Gradient norm, clipping and frozen router rows for parameters spread over several meshes.

torch's clip_grad_norm_ wants every DTensor on one mesh; here FSDP, TP and EP put parameters on
different meshes. Each group of same-layout gradients sums its local squares and all-reduces
only over the axes it is sharded on (replicated axes hold copies, which must not count twice).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

ROW_MASK = "_flexmoe_row_mask"  # set by train.freeze on router weights whose leading rows are frozen


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip in place to a global norm of `max_norm`; returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(isinstance(g, DTensor) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        if isinstance(g, DTensor):
            sharded = tuple(i for i, pl in enumerate(g.placements) if not pl.is_replicate())  # Shard, _StridedShard
            key = (g.device_mesh.mesh_dim_names, sharded)
            groups.setdefault(key, []).append(g)
        else:
            groups.setdefault(((), ()), []).append(g)
    total_sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
    # Sorted keys: every rank issues the same collectives in the same order.
    for key in sorted(groups, key=repr):
        _, sharded = key
        local = [g.to_local() if isinstance(g, DTensor) else g for g in groups[key]]
        sq = sum((t.float().pow(2).sum() for t in local), torch.zeros((), device=total_sq.device))
        if sharded:
            mesh = groups[key][0].device_mesh
            for axis in sharded:
                dist.all_reduce(sq, group=mesh.get_group(axis))
        total_sq += sq
    total = total_sq.sqrt()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


@torch.no_grad()
def mask_frozen_rows(model: nn.Module) -> None:
    """Zero the gradient of frozen router rows.

    train.freeze registers a gradient hook for this, but FSDP2 replaces parameters with sharded
    ones and computes with yet others, so under FSDP the hook never fires: this does its work on
    the reduced (sharded) gradient, before clipping, which gives the single-process numbers.
    """
    for p in model.parameters():
        n = getattr(p, ROW_MASK, 0)
        if not n or p.grad is None:
            continue
        g = p.grad
        keep = torch.ones(p.shape[0], *([1] * (p.dim() - 1)), dtype=g.dtype, device=g.device)
        keep[:n] = 0
        if isinstance(g, DTensor):
            keep = distribute_tensor(keep, g.device_mesh, g.placements, src_data_rank=None)
        g.mul_(keep)


def carry_row_masks(model: nn.Module, masks: dict[str, int]) -> None:
    """Re-attach row-mask markers (by parameter name) after wrapping replaced the parameters."""
    for name, p in model.named_parameters():
        if name in masks:
            setattr(p, ROW_MASK, masks[name])


def row_masks(model: nn.Module) -> dict[str, int]:
    return {name: getattr(p, ROW_MASK) for name, p in model.named_parameters() if getattr(p, ROW_MASK, 0)}
