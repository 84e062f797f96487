"""Tensor parallelism through DTensor plans.

Per block: q/k/v column-parallel (heads split over tp), o row-parallel (all-reduce), dense
SwiGLU column/row; MoE experts get d_ff sharded by ExpertParallel (expert.py); the router runs
replicated. Embedding row-parallel over the vocabulary, LM head column-parallel with the logits
gathered. OLMo-2's q/k RMSNorm spans the full projected width, so its statistics must cover every
tp rank's heads: the q/k projections hand DTensors (sharded on the last dim) to a norm whose
mean is a DTensor reduction over tp, rather than gathering q and k.

Sequence parallelism is not applied: the post-norm block (`h = x + norm(attn(x))`) would need
a reduce-scatter and an all-gather around every norm, which pays only on fast interconnects.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from flexmoe.model.moe import MoE
from flexmoe.model.norm import RMSNorm


class WidthShardedNorm(ParallelStyle):
    """RMSNorm over a width sharded on tp: weight Shard(0), input a DTensor Shard(-1); the
    norm's mean over the last dim becomes a cross-rank reduction. Output: the local shard."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        assert isinstance(module, RMSNorm)
        module.use_apex = False  # apex's fused kernel cannot take DTensors

        def partition(name, mod, mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                dt = distribute_tensor(p.detach(), mesh, [Shard(0)], src_data_rank=None)
                mod.register_parameter(pname, nn.Parameter(dt, requires_grad=p.requires_grad))

        return distribute_module(module, mesh, partition, output_fn=lambda mod, out, mesh: out.to_local())


def block_plan(block: nn.Module) -> dict[str, ParallelStyle]:
    plan: dict[str, ParallelStyle] = {
        "attn.q_proj": ColwiseParallel(use_local_output=False),
        "attn.k_proj": ColwiseParallel(use_local_output=False),
        "attn.q_norm": WidthShardedNorm(),
        "attn.k_norm": WidthShardedNorm(),
        "attn.v_proj": ColwiseParallel(),
        "attn.o_proj": RowwiseParallel(),
    }
    if not isinstance(block.ffn, MoE):
        plan |= {"ffn.gate_proj": ColwiseParallel(), "ffn.up_proj": ColwiseParallel(),
                 "ffn.down_proj": RowwiseParallel()}
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard attention, dense FFNs, embedding and head over `tp_mesh` (experts: see expert.py)."""
    tp = tp_mesh.size()
    parallelize_module(model, tp_mesh, {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        "lm_head": ColwiseParallel(output_layouts=Replicate()),
    }, src_data_rank=None)
    for block in model.layers:
        parallelize_module(block, tp_mesh, block_plan(block), src_data_rank=None)
        # The attention reshapes its local projections into this rank's heads only.
        block.attn.num_heads //= tp
        block.attn.num_kv_heads //= tp
