"""One entry point: apply TP, EP, activation checkpointing, compile and FSDP, in that order.

The order is fixed because each step wraps what the previous produced: TP and EP turn weights
into DTensors on the tp/ep axes; checkpointing and compile wrap block forwards; FSDP shards the
resulting (DTensor) parameters over the data-parallel axes last, as FSDP2 requires.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import parallelize_module
from torch.utils.checkpoint import checkpoint

from flexmoe.config.parallel import ParallelConfig
from flexmoe.model.moe import MoE
from flexmoe.parallel.expert import ExpertParallel
from flexmoe.parallel.fsdp import apply_fsdp
from flexmoe.parallel.grad import carry_row_masks, row_masks
from flexmoe.parallel.mesh import Meshes
from flexmoe.parallel.tensor import apply_tp


def parallelize(model: nn.Module, cfg: ParallelConfig, meshes: Meshes | None) -> nn.Module:
    """Lay `model` (a Transformer, identical on every rank, on its device) out per `cfg`; in place.

    `meshes` comes from mesh.build_mesh (None: one process, or DeepSpeed, which partitions the
    model itself: then only activation checkpointing applies here).
    """
    masks = row_masks(model)
    if meshes is not None and meshes.tp is not None:
        apply_tp(model, meshes.tp)
    if meshes is not None and meshes.experts is not None:
        apply_ep(model, meshes.experts)
    if cfg.ac != "none":
        apply_ac(model, full=cfg.ac == "full", every=cfg.ac_every)
    if cfg.compile:
        apply_compile(model, cfg.compile_backend)
    if meshes is not None and meshes.dp.size() > 1:
        apply_fsdp(model, meshes.dp, param_dtype=cfg.param_dtype, reduce_dtype=cfg.reduce_dtype,
                   expert_mesh=meshes.expert_dp, num_dp=meshes.dp_size)
    carry_row_masks(model, masks)
    return model


def apply_ep(model: nn.Module, mesh: DeviceMesh) -> None:
    """Experts: dim 0 over `ep`, d_ff over `tp` (ExpertParallel hooks dispatch and combine)."""
    for block in model.layers:
        if isinstance(block.ffn, MoE):
            parallelize_module(block.ffn.experts, mesh, ExpertParallel())


# The transformer runs a block as these two steps (attention half, FFN half), not block(...):
# layer 0's attention output feeds document routing before its FFN runs.
BLOCK_STEPS = ("attend", "feed")


def _wrap_steps(block: nn.Module, wrap) -> None:
    # In place, on the instance: parameter names (and so checkpoints) stay the same whatever
    # the AC and compile settings, unlike wrapper modules.
    for name in BLOCK_STEPS:
        setattr(block, name, wrap(getattr(block, name)))


def apply_ac(model: nn.Module, *, full: bool, every: int = 2) -> None:
    """Recompute block activations in backward: every block (full) or every `every`-th one."""
    for i, block in enumerate(model.layers):
        if full or i % every == 0:
            _wrap_steps(block, lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))


def apply_compile(model: nn.Module, backend: str = "inductor") -> None:
    """torch.compile each block's steps. Routing makes per-expert token counts data-dependent,
    so the expert loop breaks the graph; attention, norms and the router compile whole."""
    for block in model.layers:
        _wrap_steps(block, lambda f: torch.compile(f, backend=backend))


def fit_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Tensor parallelism without FSDP leaves some parameters plain (norms, router) beside
    DTensors; torch's foreach kernels cannot mix the two, so such optimizers step per tensor."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    kinds = {isinstance(p, DTensor) for p in params}
    if len(kinds) > 1:
        for g in optimizer.param_groups:
            g["foreach"] = False
