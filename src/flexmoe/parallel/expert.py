"""Expert parallelism (and tensor parallelism inside each expert) as a ParallelStyle on
GroupedExperts: MoE.forward never sees a process group.

The style shards the trainable expert stack on dim 0 over the `ep` axis. Frozen slots (the
anchor, `*_frozen`) stay replicated over `ep`: their tokens never leave the rank, so in FlexOlmo
training only the tokens routed to trainable experts travel. Over a `tp` axis every expert's
d_ff is sharded (gate/up by rows, down by columns); outputs are partial sums reduced over tp.

Dispatch (forward pre-hook, tokens arrive sorted by global expert id): per-expert counts go by
all-to-all first, then the tokens; received tokens are regrouped by local expert. Combine
(forward hook) undoes both. Every step is differentiable, so backward sends gradients back the
same way. Gradient scale: an expert's weight gradient sums the loss of every ep rank's tokens;
fsdp.py divides it by the whole data-parallel size instead of the expert-data-parallel size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from flexmoe.io.keys import EXPERT_WEIGHTS
from flexmoe.model.moe import FROZEN_SUFFIX, GroupedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 whose backward sends gradients back (splits swapped)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class _CopyToTP(torch.autograd.Function):
    """Identity forward; backward sums the input gradient's partial contributions over tp."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """Sums partial outputs over tp; the gradient of a sum is the same on every rank."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def chunk_sizes(n: int, parts: int) -> list[int]:
    """Rows per rank of Shard(0) over `parts` ranks (torch.chunk semantics, empty tails allowed)."""
    c = -(-n // parts) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(parts)]


def check_fsdp_split(num_trainable: int, ep: int) -> None:
    """Frozen experts are copied to every ep rank and trainable ones split: an ep rank left with
    none holds an empty stack, which FSDP cannot shard (it crashed while building). Refused in one
    line naming the largest ep that works."""
    if 0 in chunk_sizes(num_trainable, ep):
        best = max(e for e in range(1, ep + 1) if 0 not in chunk_sizes(num_trainable, e))
        raise ValueError(f"parallel.ep={ep} spreads {num_trainable} trainable expert(s) over {ep} ranks, leaving some "
                         f"with none (frozen experts are copied to every ep rank), which FSDP cannot shard; set "
                         f"parallel.ep={best} or lower")


def _source_to_expert_order(counts_SL: torch.Tensor) -> torch.Tensor:
    """Permutation taking tokens laid out [source][local expert] to [local expert][source]."""
    S, L = counts_SL.shape
    key_SL = torch.arange(L, device=counts_SL.device)[None, :] * S + torch.arange(S, device=counts_SL.device)[:, None]
    key_N = key_SL.reshape(-1).repeat_interleave(counts_SL.reshape(-1))
    return torch.argsort(key_N, stable=True)


class ExpertParallel(ParallelStyle):
    """Apply to a GroupedExperts with a mesh whose axes are ("ep",), ("tp",) or ("ep", "tp")."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        assert isinstance(module, GroupedExperts), type(module)
        names = mesh.mesh_dim_names or ()
        unknown = set(names) - {"ep", "tp"}
        assert not unknown and names, names
        self.ep_group = mesh.get_group("ep") if "ep" in names else None
        self.tp_group = mesh.get_group("tp") if "tp" in names else None
        for base in EXPERT_WEIGHTS:
            dff_dim = 2 if base == "down_proj" else 1
            for name in (base, base + FROZEN_SUFFIX):
                p = module._parameters.get(name)
                if p is None:
                    continue
                placements = []
                if self.ep_group is not None:
                    placements.append(Shard(0) if name == base else Replicate())
                if self.tp_group is not None:
                    placements.append(Shard(dff_dim))
                # Every rank built the same model: slice locally instead of scattering from rank 0.
                dt = distribute_tensor(p.detach(), mesh, placements, src_data_rank=None)
                module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        if self.ep_group is not None:
            ep = dist.get_world_size(self.ep_group)
            self.me = dist.get_rank(self.ep_group)
            self.sizes = chunk_sizes(module.num_experts - module.num_frozen, ep)
            assert module.local("gate_proj").shape[0] == self.sizes[self.me]
        module.register_forward_pre_hook(self._dispatch)
        module.register_forward_hook(self._combine)
        return module

    def _dispatch(self, module: GroupedExperts, args):
        x_ND, counts_E = args
        ctx = None
        if self.ep_group is not None:
            nf = module.num_frozen
            n_stay = int(counts_E[:nf].sum())
            ep, mine = len(self.sizes), self.sizes[self.me]
            counts_t = counts_E[nf:].contiguous()
            recv = counts_t.new_empty(ep * mine)
            # Counts first: each rank learns how many tokens each peer sends to each of its experts.
            dist.all_to_all_single(recv, counts_t, [mine] * ep, self.sizes, group=self.ep_group)
            recv_SL = recv.view(ep, mine)
            send_tok = [int(c.sum()) for c in torch.split(counts_t, self.sizes)]
            recv_tok = recv_SL.sum(1).tolist()
            x_in = _AllToAll.apply(x_ND[n_stay:], recv_tok, send_tok, self.ep_group)
            perm = _source_to_expert_order(recv_SL)
            x_ND = torch.cat([x_ND[:n_stay], x_in[perm]])
            tags = module.row_tags  # DP clipping only (train/ghost.py): each row's unit travels with it
            if tags is not None:
                tags_in = tags.new_empty(sum(recv_tok))
                dist.all_to_all_single(tags_in, tags[n_stay:].contiguous(), recv_tok, send_tok, group=self.ep_group)
                module.row_tags = torch.cat([tags[:n_stay], tags_in[perm]])
            counts_E = torch.cat([counts_E[:nf], recv_SL.sum(0)])
            ctx = (n_stay, torch.argsort(perm), send_tok, recv_tok)
        if self.tp_group is not None:
            x_ND = _CopyToTP.apply(x_ND, self.tp_group)
        module._ep_ctx = ctx
        return x_ND, counts_E

    def _combine(self, module: GroupedExperts, args, y_ND: torch.Tensor) -> torch.Tensor:
        if self.tp_group is not None:
            y_ND = _ReduceFromTP.apply(y_ND, self.tp_group)
        ctx, module._ep_ctx = module._ep_ctx, None
        if ctx is not None:
            n_stay, inv, send_tok, recv_tok = ctx
            y_back = _AllToAll.apply(y_ND[n_stay:][inv], send_tok, recv_tok, self.ep_group)
            y_ND = torch.cat([y_ND[:n_stay], y_back])
            if self.sizes[self.me] == 0 and torch.is_grad_enabled():
                # This rank holds no trainable expert (e.g. 1 trainable over ep=2), so the forward
                # never touched its empty shard: tie it in for a (zero) gradient, so that every
                # rank reduces, clips and steps the same set of tensors.
                for name in EXPERT_WEIGHTS:
                    w = module.local(name)
                    if w.requires_grad:
                        y_ND = y_ND + w.sum() * 0
        return y_ND
