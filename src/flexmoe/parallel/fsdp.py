"""FSDP2 (`fully_shard`) per block, embedding and head, with a mixed-precision policy.

Frozen parameters (requires_grad False: the anchor expert, and attention, embeddings and norms
in the expert_anchor stage) are sharded for memory and all-gathered for compute, but FSDP2
reduces only gradients that exist, so they are never reduce-scattered, and the optimizer is
built from trainable parameters only, so they get no optimizer state.

Under expert parallelism each block's experts form their own FSDP unit on the expert-data-
parallel axes (ranks holding the same experts), sharded on dim 1 because dim 0 belongs to ep.
Without it expert stacks are sharded on dim 1 too: their dim 0 counts experts, and a frozen
anchor stack `[1, d_ff, d_model]` (or FlexOlmo's one trainable expert) sharded on it would sit
whole on the first rank and leave the others nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from flexmoe.model.moe import MoE
from flexmoe.parallel.expert import check_fsdp_split

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, *, param_dtype: str = "fp32", reduce_dtype: str = "fp32",
               expert_mesh: DeviceMesh | None = None, num_dp: int = 1) -> None:
    """Shard `model` over `dp_mesh` (1D FSDP, or 2D (replicate, shard) HSDP).

    `expert_mesh`: with expert parallelism, the (dp_replicate, edp) mesh for expert weights;
    their gradients are summed over the ep ranks' tokens by the all-to-all already, so the
    reduction divides by the whole data-parallel size `num_dp`, not by the expert mesh's size.
    """
    mp = MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])
    for block in model.layers:
        if expert_mesh is not None and isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            w = experts._parameters.get("gate_proj")
            if isinstance(w, DTensor) and "ep" in (w.device_mesh.mesh_dim_names or ()):
                check_fsdp_split(experts.num_experts - experts.num_frozen, w.device_mesh["ep"].size())
            fully_shard(experts, mesh=expert_mesh, mp_policy=mp, shard_placement_fn=lambda p: Shard(1))
            experts.set_gradient_divide_factor(float(num_dp))
            # gloo lacks NCCL's PREMUL_SUM: sum, then divide. Not on a 1-rank expert mesh, where
            # FSDP would divide twice (it skips the collective and divides on its own).
            if expert_mesh.size() > 1 and dist.get_backend(expert_mesh.get_group(0)) == "gloo":
                experts.set_force_sum_reduction_for_comms(True)
        # One unit per block. The transformer calls a block's steps (attend, feed) rather than the
        # block itself, so the unit is the block's children: FSDP2 gathers them at the first one.
        stacks = {id(p) for p in block.ffn.experts.parameters()} if isinstance(block.ffn, MoE) else set()
        fully_shard(list(block.children()), mesh=dp_mesh, mp_policy=mp,
                    shard_placement_fn=lambda p, stacks=stacks: Shard(1) if id(p) in stacks else None)
    fully_shard(model.embed, mesh=dp_mesh, mp_policy=mp)
    # The final norm and head run back to back: one unit, one all-gather. Not resharded after
    # forward because backward needs them first.
    fully_shard([model.norm, model.lm_head], mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=False)
