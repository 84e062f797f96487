"""Per-unit clipped gradients from one batched forward and one backward (book-keeping clipping).

DP-SGD needs, for every privacy unit u of a batch (a training window, or a document made of
several windows), the norm of u's own gradient, and then sum_u c_u * grad_u with
c_u = min(1, C / |grad_u|). The reference (train/privacy.py, `clipped_sample_grads`) runs one
backward per window. Here the whole batch runs forward once and backward once, and every
trainable tensor's per-unit gradient is assembled from what that pass already computed:

- expert FFN weights (`gate_proj`, `up_proj`, `down_proj` of the trainable slots): a weight's
  gradient is sum_rows grad_out_row (x) input_row over the rows the dispatch gave that expert,
  and each row is one token of one window, so of one unit. Its squared norm per unit is either
  the "ghost norm" sum((G G^T) * (A A^T)) over that unit's rows (n^2 (in + out) work) or the
  materialised n x in x out product, whichever is cheaper for that unit, each as batched
  matmuls over the units' zero-padded row blocks. The clipped sum is then the c_u-weighted sum
  of the materialised products where every unit's was kept, else one matmul with every row's
  output gradient scaled by its unit's c_u.
- router rows and biases: tiny, so each unit's gradient is materialised (one batched
  vector-Jacobian product of the router's logits, `vmap`ped over units) and the rows the freeze
  plan keeps fixed are masked.

The rows (x) and pre-activations (gate, up, SwiGLU intermediate) of the trainable experts are the
forward's own tensors, kept by GroupedExperts' opt-in capture point (which runs the per-expert
loop, whose intermediates are graph tensors). The output gradients of gate, up, down and of the
router logits come from one `torch.autograd.grad` over those tensors: the backward of ordinary
training without its weight gradients, and nothing recomputed.

Token -> unit: row r of an MoE layer's expert input is token `argsort(top_idx)[r] // k` of the
flattened batch (the dispatch's stable sort, recomputed from the router's output), token t lies
in window t // S, and window b belongs to unit `unit_of_window[b]`. A pre-hook hands each row's
unit to the experts (`GroupedExperts.row_tags`) before an expert-parallel dispatch, which sends
the tags with the rows, so the rank holding an expert knows the unit of every row it received.

Parallel layouts: unit ids are global to the step; each rank adds the squared norms of the pieces
it computes (its experts' rows, its tp slice of d_ff, the router on one tp rank) and the squares
are all-reduced, so every rank has every unit's norm and writes the clipped sum of its own pieces
into the full tensors the caller adds over ranks (train/privacy.py `private_gradient`).

Exact only when units do not interact, which holds for windows (each is its own sequence) and
for documents cut into windows of their own; and when the loss is a sum over windows (no
batch-level auxiliary loss: `lb_loss_weight` and `z_loss_weight` must be 0). `supported()` says
whether a model qualifies; the caller falls back to the reference otherwise.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from torch.distributed.tensor import DTensor

from flexmoe.model.moe import MoE, router_logits


def supported(model, params: Sequence[torch.nn.Parameter]) -> str | None:
    """None when every trainable tensor is an expert stack or router tensor of an MoE layer and the
    loss has no batch-level term; else why not (the reference path then runs)."""
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return "the model has no MoE layers"
    if any(m.lb_loss_weight > 0 or m.z_loss_weight > 0 for m in moes):
        return "an auxiliary router loss couples the windows of a batch (lb_loss_weight / z_loss_weight > 0)"
    covered = {id(p) for m in moes for p in (m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj,
                                              m.router.weight, m.router.bias) if p is not None}
    other = [p for p in params if id(p) not in covered]
    if other:
        return f"{len(other)} trainable tensors outside the experts and routers (freeze plan trains shared layers)"
    return None


@dataclass
class _Layer:
    moe: MoE
    x_TD: torch.Tensor | None = None  # router input
    logits_TE: torch.Tensor | None = None
    top_idx_TK: torch.Tensor | None = None
    counts_E: torch.Tensor | None = None  # expert input rows per expert
    tags_N: torch.Tensor | None = None  # each expert input row's unit (moved by the expert-parallel dispatch)
    # per trainable expert: (slot, x rows, gate and up pre-activations, SwiGLU intermediate, output),
    # from GroupedExperts' capture point; past the backward, (slot, x rows, SwiGLU intermediate)
    experts: list = field(default_factory=list)


class _Capture:
    """Forward hooks and the experts' capture points that keep, per MoE layer, what the per-unit
    gradients are assembled from."""

    def __init__(self, model, unit_T: torch.Tensor):
        self.layers = [_Layer(m) for m in model.modules() if isinstance(m, MoE)]
        self._handles = []
        for rec in self.layers:
            self._handles.append(rec.moe.router.register_forward_hook(self._router_hook(rec)))
            # first, before an expert-parallel dispatch hook: it then carries the tags with the rows
            self._handles.append(rec.moe.experts.register_forward_pre_hook(self._tag_hook(rec, unit_T), prepend=True))
            self._handles.append(rec.moe.experts.register_forward_hook(self._experts_hook(rec)))
            if rec.moe.experts.gate_proj.requires_grad:
                rec.moe.experts.capture = rec.experts

    @staticmethod
    def _router_hook(rec: _Layer):
        def hook(_mod, args, out):
            rec.x_TD, rec.logits_TE, rec.top_idx_TK = args[0].detach(), out[0], out[3].detach()
        return hook

    @staticmethod
    def _tag_hook(rec: _Layer, unit_T: torch.Tensor):
        def hook(mod, args):
            # MoE.forward's dispatch order: row r is token argsort(top_idx)[r] // k (a stable sort)
            K = rec.top_idx_TK.shape[1]
            mod.row_tags = unit_T[torch.argsort(rec.top_idx_TK.reshape(-1), stable=True) // K]
        return hook

    @staticmethod
    def _experts_hook(rec: _Layer):
        def hook(mod, args, out):
            rec.counts_E, rec.tags_N, mod.row_tags = args[1], mod.row_tags, None
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        for rec in self.layers:
            rec.moe.experts.capture = None
            rec.moe.experts.row_tags = None


KEEP_BYTES = 64 << 20  # per weight: per-unit gradients up to this size are kept for the clipped sum;
# also the most one batched product of _unit_sq_norms holds (its padded blocks and result)


def _unit_sq_norms(G_NO: torch.Tensor, A_NI: torch.Tensor, unit_N: torch.Tensor, num_units: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per unit u, |sum_{rows of u} G_row (x) A_row|_F^2 in float64: the ghost norm where a unit's
    rows are few, the materialised product where they are many, each as batched matmuls over
    units' row blocks (zero-padded to the longest of a chunk; units sorted by row count, so the
    padding stays small). Second: the per-unit products `[U, O, I]` when every unit's was
    materialised and they fit in KEEP_BYTES (the clipped sum is then their weighted sum instead of
    one more pass over the rows), else None."""
    out = torch.zeros(num_units, dtype=torch.float64, device=G_NO.device)
    o, i = G_NO.shape[1], A_NI.shape[1]
    if G_NO.shape[0] == 0:
        return out, None
    if not bool((unit_N[1:] >= unit_N[:-1]).all()):  # window units need no sort: the dispatch keeps token order
        order = torch.argsort(unit_N, stable=True)
        G_NO, A_NI = G_NO[order], A_NI[order]
    counts = torch.bincount(unit_N, minlength=num_units).tolist()
    starts = [0] + list(itertools.accumulate(counts))[:-1]
    ghost = [u for u, n in enumerate(counts) if n and n * (o + i) <= o * i]
    product = [u for u, n in enumerate(counts) if n * (o + i) > o * i]
    keep = not ghost and num_units * o * i * G_NO.element_size() <= KEEP_BYTES
    kept = None
    for units, is_ghost in ((ghost, True), (product, False)):
        # a unit's padded row blocks, and its two Gram matrices and their product, or its o x i product
        for chunk, n in _chunks(units, counts, lambda n, gram=is_ghost: (n * (o + i) + (
                3 * n * n if gram else o * i)) * G_NO.element_size()):
            g, a = _blocks(G_NO, chunk, starts, counts, n), _blocks(A_NI, chunk, starts, counts, n)
            idx = torch.tensor(chunk, device=out.device)
            if is_ghost:
                gram = torch.bmm(g, g.transpose(1, 2)) * torch.bmm(a, a.transpose(1, 2))
                out[idx] = gram.sum((1, 2), dtype=torch.float64)
                continue
            prod = torch.bmm(g.transpose(1, 2), a)
            out[idx] = prod.square().sum((1, 2), dtype=torch.float64)
            if keep and chunk == list(range(num_units)):
                kept = prod
            elif keep:
                kept = G_NO.new_zeros(num_units, o, i) if kept is None else kept
                kept[idx] = prod
    return out, kept


def _chunks(units: list[int], counts: list[int], unit_bytes):
    """(chunk of units, its longest unit's row count): the units by row count, longest first
    (equal counts in unit order), in chunks whose padded blocks take at most KEEP_BYTES
    (`unit_bytes(n)` each), at least one unit each."""
    units = sorted(units, key=lambda u: -counts[u])
    while units:
        n = counts[units[0]]
        k = max(1, KEEP_BYTES // max(1, unit_bytes(n)))
        yield units[:k], n
        units = units[k:]


def _blocks(X_NC: torch.Tensor, units: list[int], starts: list[int], counts: list[int], n: int) -> torch.Tensor:
    """`[len(units), n, C]`: each unit's rows of X (contiguous from starts[u]), zero-padded to n;
    a view when the units are consecutive and all have n rows (window units)."""
    first = starts[units[0]]
    if all(counts[u] == n and starts[u] == first + k * n for k, u in enumerate(units)):
        return X_NC[first:first + len(units) * n].reshape(len(units), n, X_NC.shape[1])
    out = X_NC.new_zeros(len(units), n, X_NC.shape[1])
    for k, u in enumerate(units):
        out[k, :counts[u]] = X_NC[starts[u]:starts[u] + counts[u]]
    return out


def book_keeping_grads(model, batch_BS: torch.Tensor, unit_of_window: torch.Tensor, num_units: int,
                       params: Sequence[torch.nn.Parameter], max_grad_norm: float,
                       masks: Sequence[torch.Tensor | None], expert_mask: torch.Tensor | None = None,
                       loss_mask: torch.Tensor | None = None, *, count_router: bool = True
                       ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(sum over units of each unit's gradient scaled to norm <= max_grad_norm, per-unit norms before
    clipping [U] (float64), per-window losses [B]), for `params` in their order. Frozen coordinates
    (masks) are zero and do not count in the norms. `loss_mask` `[B, S]`: the targets that train
    (a window's loss is then their sum over S, as privacy.sample_loss computes it).

    Under torch.distributed every rank passes its own windows with unit ids global to the step
    (0..num_units-1 over all ranks). Each rank adds the squared norms of the gradient pieces it
    computes: the router's for its own tokens (`count_router`: False on all but one rank of a
    group that computes the same tokens, the tensor-parallel ranks), and the expert weights' it
    holds (an ep rank's experts, a tp rank's d_ff slice) for every row they received, whatever the
    rank it came from; the squares are summed over ranks, so every rank gets every unit's norm.
    The returned sums are full tensors holding this rank's pieces only (zero elsewhere): their sum
    over ranks is the clipped sum."""
    import torch.distributed as dist

    B, S1 = batch_BS.shape
    S = S1 - 1
    unit_T = unit_of_window.to(batch_BS.device).repeat_interleave(S)
    cap = _Capture(model, unit_T)
    try:
        out = model(batch_BS[:, :-1], expert_mask)
    finally:
        cap.close()
    logits = out.logits.float()
    loss_BS = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch_BS[:, 1:].reshape(-1),
                              reduction="none").view(B, S)
    # each window's loss as the reference's sample_loss computes it
    loss_B = loss_BS.mean(1) if loss_mask is None else (loss_BS * loss_mask.to(loss_BS.dtype)).sum(1) / S
    # the output gradients of every trainable expert's down, gate and up projections and of the
    # routers' logits, from the one backward (it stops at the first layer's captured tensors)
    wanted = [t for rec in cap.layers for t in [rec.logits_TE] + [t for _, _, g, u, _, y in rec.experts
                                                                      for t in (y, g, u)]]
    grads = iter(torch.autograd.grad(loss_B.sum(), wanted, materialize_grads=True))
    del wanted  # past the backward only the rows and SwiGLU intermediates are needed: let the rest go
    for rec in cap.layers:
        rec.experts[:] = [(s, x.detach(), h.detach()) for s, x, _, _, h, _ in rec.experts]
    index = {id(p): j for j, p in enumerate(params)}
    full = {id(p): _full(p) for p in params}  # sharded tensors gathered, in the same order on every rank
    sq = torch.zeros(num_units, dtype=torch.float64, device=batch_BS.device)
    expert_parts, router_parts = [], []
    for rec in cap.layers:
        ex = rec.moe.experts
        dlogits_TE = next(grads)
        if rec.experts:
            offsets = torch.cumsum(rec.counts_E, 0).tolist()
        for s, x, h in rec.experts:
            dy, dg, du = next(grads), next(grads), next(grads)
            hi = offsets[ex.num_frozen + s]
            unit_n = rec.tags_N[hi - x.shape[0]:hi]
            parts = ((dg, x), (du, x), (dy, h))
            kept = []
            for (G, A) in parts:
                sq_part, per_unit = _unit_sq_norms(G, A, unit_n, num_units)
                sq += sq_part
                kept.append(per_unit)
            expert_parts.append((ex, s, parts, unit_n, kept))
        router_params = [p for p in (rec.moe.router.weight, rec.moe.router.bias) if p is not None and p.requires_grad]
        if router_params:
            per_unit = _router_unit_grads(rec, dlogits_TE, unit_T, num_units, [full[id(p)] for p in router_params],
                                          [masks[index[id(p)]] for p in router_params],
                                          has_bias=rec.moe.router.bias is not None and rec.moe.router.bias.requires_grad)
            if count_router:
                for g in per_unit:
                    sq += g.double().square().flatten(1).sum(1)
                router_parts.append((router_params, per_unit))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    norms = sq.sqrt()
    scale = torch.clamp(max_grad_norm / (norms + 1e-6), max=1.0)  # the reference's min(1, C / (norm + 1e-6))
    total = [torch.zeros_like(full[id(p)]) for p in params]
    for ex, s, parts, unit_n, kept in expert_parts:
        c = scale[unit_n].to(parts[0][0].dtype)[:, None]
        for name, (G, A), per_unit in zip(("gate_proj", "up_proj", "down_proj"), parts, kept):
            w = getattr(ex, name)
            block = total[index[id(w)]][_expert_block(w, name)]  # this rank's experts and d_ff slice: a view
            if per_unit is not None:  # sum_u c_u G_u from the products the norms already made
                block[s] += torch.einsum("u,uoi->oi", scale.to(per_unit.dtype), per_unit)
            else:
                block[s] += (G * c).T @ A
    for router_params, per_unit in router_parts:
        for p, g in zip(router_params, per_unit):
            total[index[id(p)]] += torch.einsum("u,u...->...", scale.to(g.dtype), g)
    return total, norms, loss_B.detach()


def _expert_block(w: torch.Tensor, name: str) -> tuple[slice, ...]:
    """The part of the full expert stack `w` that this rank computes with in forward: under expert
    parallelism its experts (dim 0 over `ep`), under tensor parallelism its d_ff slice (gate/up dim
    1, down dim 2 over `tp`), as parallel/expert.py lays them out (torch.chunk's split); all of it
    otherwise (FSDP gathers whole stacks for compute)."""
    from flexmoe.parallel.expert import chunk_sizes

    block = [slice(None)] * w.dim()
    names = (w.device_mesh.mesh_dim_names or ()) if isinstance(w, DTensor) else ()
    for axis, dim in (("ep", 0), ("tp", 2 if name == "down_proj" else 1)):
        if axis in names:
            i = names.index(axis)
            sizes = chunk_sizes(w.shape[dim], w.device_mesh.size(i))
            r = w.device_mesh.get_local_rank(i)
            block[dim] = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
    return tuple(block)


def _full(p: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `p`'s values (a DTensor is gathered: a collective, every rank calls it)."""
    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p


def _router_unit_grads(rec: _Layer, dlogits_TE, unit_T, num_units: int, router_params, masks, *,
                       has_bias: bool) -> list[torch.Tensor]:
    """Per trainable router tensor (given as plain copies: weight, then bias if `has_bias`),
    `[U, ...]`: each unit's gradient, the vector-Jacobian product of the router's logits over that
    unit's tokens (any router: plain, cosine, with bias). Batched: every unit of a chunk gets its
    own copy of the router tensors and its tokens as one zero-padded block (padding rows carry a
    zero logit gradient), and `vmap` over router_logits turns one VJP into all of theirs."""
    router = rec.moe.router
    out = [torch.zeros(num_units, *p.shape, dtype=p.dtype, device=p.device) for p in router_params]
    if dlogits_TE is None:
        return out
    # -inf (masked) logits have zero gradient; the recomputed logits there are finite
    dlogits_TE = torch.nan_to_num(dlogits_TE, nan=0.0, posinf=0.0, neginf=0.0)
    x_TD = rec.x_TD
    if not bool((unit_T[1:] >= unit_T[:-1]).all()):
        order = torch.argsort(unit_T, stable=True)
        x_TD, dlogits_TE = x_TD[order], dlogits_TE[order]
    counts = torch.bincount(unit_T, minlength=num_units).tolist()
    starts = [0] + list(itertools.accumulate(counts))[:-1]
    D, E = x_TD.shape[1], dlogits_TE.shape[1]
    row_bytes = (D + 2 * E) * x_TD.element_size()
    for chunk, n in _chunks([u for u, c in enumerate(counts) if c], counts, lambda n: n * row_bytes):
        leaves = [p.detach().expand(len(chunk), *p.shape).clone().requires_grad_() for p in router_params]
        weight = leaves[0] if router.weight.requires_grad else _full(router.weight)
        bias = None if router.bias is None else (leaves[-1] if has_bias else _full(router.bias))
        per_unit = torch.func.vmap(router_logits, in_dims=(0, 0 if router.weight.requires_grad else None,
                                                           0 if has_bias else None, None))
        with torch.enable_grad():
            logits = per_unit(_blocks(x_TD, chunk, starts, counts, n), weight, bias, router.cosine_temp)
            gs = torch.autograd.grad(logits, leaves, _blocks(dlogits_TE, chunk, starts, counts, n),
                                     allow_unused=True)
        idx = torch.tensor(chunk, device=x_TD.device)
        for o, g, m in zip(out, gs, masks):
            if g is not None:
                o[idx] = g * m if m is not None else g
    return out
