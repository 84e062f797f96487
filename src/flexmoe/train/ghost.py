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
  materialised n x in x out product, whichever is cheaper for that block. The clipped sum is
  then one matmul with every row's output gradient scaled by its unit's c_u.
- router rows and biases: tiny, so each unit's gradient is materialised (one vector-Jacobian
  product of the router's logits per unit) and the rows the freeze plan keeps fixed are masked.

The output gradients come from one `torch.autograd.grad` over the experts' outputs and the router
logits; the experts' SwiGLU intermediates are recomputed from their (saved) inputs, which costs
one forward of the trainable experts and no backward through the rest of the model.

Token -> unit: row r of an MoE layer's expert input is token `argsort(top_idx)[r] // k` of the
flattened batch (the dispatch's stable sort, recomputed from the router's output), token t lies
in window t // S, and window b belongs to unit `unit_of_window[b]`.

Exact only when units do not interact, which holds for windows (each is its own sequence) and
for documents cut into windows of their own; and when the loss is a sum over windows (no
batch-level auxiliary loss: `lb_loss_weight` and `z_loss_weight` must be 0). `supported()` says
whether a model qualifies; the caller falls back to the reference otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
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
    for m in moes:
        w = m.experts.gate_proj
        if isinstance(w, DTensor) and w.device_mesh.ndim != 1:
            return "the experts are laid out on a multi-dimensional mesh (tensor or expert parallelism)"
    return None


@dataclass
class _Layer:
    moe: MoE
    x_TD: torch.Tensor | None = None  # router input
    logits_TE: torch.Tensor | None = None
    top_idx_TK: torch.Tensor | None = None
    x_ND: torch.Tensor | None = None  # expert input rows, sorted by expert
    counts_E: torch.Tensor | None = None
    y_ND: torch.Tensor | None = None  # expert output rows


class _Capture:
    """Forward hooks that keep, per MoE layer, what the per-unit gradients are assembled from."""

    def __init__(self, model):
        self.layers = [_Layer(m) for m in model.modules() if isinstance(m, MoE)]
        self._handles = []
        for rec in self.layers:
            self._handles.append(rec.moe.router.register_forward_hook(self._router_hook(rec)))
            self._handles.append(rec.moe.experts.register_forward_hook(self._experts_hook(rec)))

    @staticmethod
    def _router_hook(rec: _Layer):
        def hook(_mod, args, out):
            rec.x_TD, rec.logits_TE, rec.top_idx_TK = args[0].detach(), out[0], out[3].detach()
        return hook

    @staticmethod
    def _experts_hook(rec: _Layer):
        def hook(_mod, args, out):
            rec.x_ND, rec.counts_E, rec.y_ND = args[0].detach(), args[1], out
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


KEEP_BYTES = 64 << 20  # per weight: per-unit gradients up to this size are kept for the clipped sum


def _unit_sq_norms(G_NO: torch.Tensor, A_NI: torch.Tensor, unit_N: torch.Tensor, num_units: int
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per unit u, |sum_{rows of u} G_row (x) A_row|_F^2 in float64: the ghost norm where a unit's
    rows are few, the materialised product where they are many. Second: the per-unit products
    `[U, O, I]` when every unit's was materialised and they fit in KEEP_BYTES (the clipped sum is
    then their weighted sum instead of one more pass over the rows), else None."""
    out = torch.zeros(num_units, dtype=torch.float64, device=G_NO.device)
    o, i = G_NO.shape[1], A_NI.shape[1]
    if G_NO.shape[0] == 0:
        return out, None
    order = torch.argsort(unit_N, stable=True)
    counts = torch.bincount(unit_N, minlength=num_units).tolist()
    G_NO, A_NI = G_NO[order], A_NI[order]
    keep = num_units * o * i * G_NO.element_size() <= KEEP_BYTES and all(
        n == 0 or n * (o + i) > o * i for n in counts)
    kept = G_NO.new_zeros(num_units, o, i) if keep else None
    start = 0
    for u, n in enumerate(counts):
        if n:
            g, a = G_NO[start:start + n], A_NI[start:start + n]
            if n * (o + i) <= o * i:
                out[u] = ((g @ g.T) * (a @ a.T)).sum(dtype=torch.float64)
            else:
                prod = g.T @ a
                out[u] = prod.square().sum(dtype=torch.float64)
                if kept is not None:
                    kept[u] = prod
            start += n
    return out, kept


def _swiglu_parts(x_nD, gate, up, down, dy_nD):
    """(inputs, output grads) of gate, up and down for rows x_nD of one expert, given the expert's
    output gradient: the SwiGLU forward recomputed, its backward to the pre-activations only."""
    with torch.enable_grad():
        g = F.linear(x_nD, gate.detach()).requires_grad_()
        u = F.linear(x_nD, up.detach()).requires_grad_()
        h = F.silu(g) * u
        y = F.linear(h, down.detach())
        dg, du = torch.autograd.grad(y, [g, u], dy_nD)
    return ((dg, x_nD), (du, x_nD), (dy_nD, h.detach()))


def book_keeping_grads(model, batch_BS: torch.Tensor, unit_of_window: torch.Tensor, num_units: int,
                       params: Sequence[torch.nn.Parameter], max_grad_norm: float,
                       masks: Sequence[torch.Tensor | None], expert_mask: torch.Tensor | None = None,
                       loss_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(sum over units of each unit's gradient scaled to norm <= max_grad_norm, per-unit norms before
    clipping [U] (float64), per-window losses [B]), for `params` in their order. Frozen coordinates
    (masks) are zero and do not count in the norms. `loss_mask` `[B, S]`: the targets that train
    (a window's loss is then their sum over S, as privacy.sample_loss computes it)."""
    B, S1 = batch_BS.shape
    S = S1 - 1
    cap = _Capture(model)
    try:
        out = model(batch_BS[:, :-1], expert_mask)
    finally:
        cap.close()
    logits = out.logits.float()
    loss_BS = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch_BS[:, 1:].reshape(-1),
                              reduction="none").view(B, S)
    # each window's loss as the reference's sample_loss computes it
    loss_B = loss_BS.mean(1) if loss_mask is None else (loss_BS * loss_mask.to(loss_BS.dtype)).sum(1) / S
    wanted = [t for rec in cap.layers for t in (rec.y_ND, rec.logits_TE)]
    grads = torch.autograd.grad(loss_B.sum(), wanted, allow_unused=True)
    unit_of_window = unit_of_window.to(batch_BS.device)
    unit_T = unit_of_window.repeat_interleave(S)
    index = {id(p): j for j, p in enumerate(params)}
    full = {id(p): _full(p) for p in params}  # sharded (FSDP) tensors gathered, in the same order on every rank
    sq = torch.zeros(num_units, dtype=torch.float64, device=batch_BS.device)
    expert_parts, router_parts = [], []
    for rec, (dy_ND, dlogits_TE) in zip(cap.layers, zip(grads[0::2], grads[1::2])):
        ex = rec.moe.experts
        K = rec.top_idx_TK.shape[1]
        token_N = torch.argsort(rec.top_idx_TK.reshape(-1), stable=True) // K
        unit_N = unit_T[token_N]
        if dy_ND is None:
            dy_ND = torch.zeros_like(rec.y_ND)
        offsets = [0] + torch.cumsum(rec.counts_E, 0).tolist()
        if ex.gate_proj.requires_grad:
            for e in range(ex.num_frozen, ex.num_experts):
                s, lo, hi = e - ex.num_frozen, offsets[e], offsets[e + 1]
                parts = _swiglu_parts(rec.x_ND[lo:hi], full[id(ex.gate_proj)][s], full[id(ex.up_proj)][s],
                                      full[id(ex.down_proj)][s], dy_ND[lo:hi])
                kept = []
                for (G, A) in parts:
                    sq_part, per_unit = _unit_sq_norms(G, A, unit_N[lo:hi], num_units)
                    sq += sq_part
                    kept.append(per_unit)
                expert_parts.append((ex, s, parts, unit_N[lo:hi], kept))
        router_params = [p for p in (rec.moe.router.weight, rec.moe.router.bias) if p is not None and p.requires_grad]
        if router_params:
            per_unit = _router_unit_grads(rec, dlogits_TE, unit_T, num_units, [full[id(p)] for p in router_params],
                                          [masks[index[id(p)]] for p in router_params],
                                          has_bias=rec.moe.router.bias is not None and rec.moe.router.bias.requires_grad)
            for g in per_unit:
                sq += g.double().square().flatten(1).sum(1)
            router_parts.append((router_params, per_unit))
    norms = sq.sqrt()
    scale = torch.clamp(max_grad_norm / (norms + 1e-6), max=1.0)  # the reference's min(1, C / (norm + 1e-6))
    total = [torch.zeros_like(full[id(p)]) for p in params]
    for ex, s, parts, unit_n, kept in expert_parts:
        c = scale[unit_n].to(parts[0][0].dtype)[:, None]
        for name, (G, A), per_unit in zip(("gate_proj", "up_proj", "down_proj"), parts, kept):
            if per_unit is not None:  # sum_u c_u G_u from the products the norms already made
                total[index[id(getattr(ex, name))]][s] += torch.einsum("u,uoi->oi", scale.to(per_unit.dtype), per_unit)
            else:
                total[index[id(getattr(ex, name))]][s] += (G * c).T @ A
    for router_params, per_unit in router_parts:
        for p, g in zip(router_params, per_unit):
            total[index[id(p)]] += torch.einsum("u,u...->...", scale.to(g.dtype), g)
    return total, norms, loss_B.detach()


def _full(p: torch.Tensor) -> torch.Tensor:
    """A plain tensor of `p`'s values (a DTensor is gathered: a collective, every rank calls it)."""
    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p


def _router_unit_grads(rec: _Layer, dlogits_TE, unit_T, num_units: int, router_params, masks, *,
                       has_bias: bool) -> list[torch.Tensor]:
    """Per trainable router tensor (given as plain copies: weight, then bias if `has_bias`),
    `[U, ...]`: each unit's gradient, one vector-Jacobian product of the router's logits over that
    unit's tokens (any router: plain, cosine, with bias)."""
    router = rec.moe.router
    out = [torch.zeros(num_units, *p.shape, dtype=p.dtype, device=p.device) for p in router_params]
    leaves = [p.detach().requires_grad_() for p in router_params]
    weight = leaves[0] if router.weight.requires_grad else _full(router.weight)
    bias = None if router.bias is None else (leaves[-1] if has_bias else _full(router.bias))
    if dlogits_TE is None:
        return out
    # -inf (masked) logits have zero gradient; the recomputed logits there are finite
    dlogits_TE = torch.nan_to_num(dlogits_TE, nan=0.0, posinf=0.0, neginf=0.0)
    for u in range(num_units):
        rows = (unit_T == u).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        with torch.enable_grad():
            logits = router_logits(rec.x_TD[rows], weight, bias, router.cosine_temp)
            gs = torch.autograd.grad(logits, leaves, dlogits_TE[rows], allow_unused=True)
        for j, (g, m) in enumerate(zip(gs, masks)):
            if g is not None:
                out[j][u] = g * m if m is not None else g
    return out
