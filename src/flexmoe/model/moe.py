"""Mixture-of-experts FFN built from small pieces: a router, a dropless sort-based dispatch and
stacked `[E, ...]` SwiGLU experts (grouped matmul, or a per-expert loop).

Opt-out works by masking router logits to -inf *before* the softmax: the remaining experts'
probabilities are then exactly those of a model merged without the masked expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import EXPERT_WEIGHTS
from flexmoe.model.linear import as_compute

FROZEN_SUFFIX = "_frozen"


@dataclass
class Routing:
    """What one MoE layer decided for a batch: kept for attribution and routing statistics."""

    probs_TE: torch.Tensor  # fp32 router probabilities after masking
    top_idx_TK: torch.Tensor
    top_w_TK: torch.Tensor


def router_logits(x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None,
                  cosine_temp: float = 0.0) -> torch.Tensor:
    """The router's fp32 logits for tokens `x_TD` from given weights (DP clipping recomputes them
    from gathered copies of sharded ones)."""
    if cosine_temp > 0:
        # Cosine routing: only the direction of a row counts, so no owner wins tokens by a
        # larger row norm; the temperature sets how sharp the choice is.
        logits_TE = F.linear(F.normalize(x_TD.float(), dim=-1), F.normalize(weight_ED.float(), dim=-1))
        logits_TE = logits_TE / cosine_temp
    else:
        logits_TE = F.linear(x_TD.float(), weight_ED.float())
    if bias_E is not None:
        # FlexOlmo: biases only ever push an expert down, and the anchor (expert 0) keeps 0.
        b = bias_E.float().clamp(max=0.0)
        b = torch.cat([b.new_zeros(1), b[1:]])
        logits_TE = logits_TE + b
    return logits_TE


class Router(nn.Module):
    """Token-choice top-k router in fp32 with an optional non-positive per-expert bias."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, norm_topk_prob: bool, bias: bool,
                 routing: str = "topk", cosine_temp: float = 0.0):
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = num_experts, top_k, norm_topk_prob
        self.routing, self.cosine_temp = routing, cosine_temp
        self.weight = nn.Parameter(torch.zeros(num_experts, d_model))
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return router_logits(x_TD, self.weight, self.bias, self.cosine_temp)

    def forward(self, x_TD: torch.Tensor, expert_mask: torch.Tensor | None = None,
                choice_T: torch.Tensor | None = None):
        """-> (logits_TE, probs_TE, top_w_TK, top_idx_TK). `choice_T`: the domain expert per token
        picked by document routing (0 = anchor only), for `routing=anchor_doc`."""
        logits_TE = self.logits(x_TD)
        if expert_mask is not None:
            logits_TE = logits_TE.masked_fill(~expert_mask.to(logits_TE.device), float("-inf"))
        if self.routing != "topk":
            return self._anchor_pair(logits_TE, choice_T)
        probs_TE = logits_TE.softmax(dim=-1)
        k = self.top_k
        if expert_mask is not None:
            # A masked model must compute what a model merged without those experts computes,
            # whose top-k is capped at its expert count.
            k = min(k, int(expert_mask.sum()))
        top_w_TK, top_idx_TK = torch.topk(probs_TE, k, dim=-1)
        if self.norm_topk_prob:
            top_w_TK = top_w_TK / top_w_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, top_w_TK, top_idx_TK

    def _anchor_pair(self, logits_TE: torch.Tensor, choice_T: torch.Tensor | None):
        """The anchor plus one domain expert, weighed by the softmax over just that pair."""
        if choice_T is None:  # anchor_top1: best domain expert by logit; none when all are masked
            best_T = logits_TE[:, 1:].max(dim=-1)
            choice_T = best_T.indices + 1
            anchor_only = torch.isinf(best_T.values)
        else:
            anchor_only = choice_T == 0
        pair_T2 = torch.stack([logits_TE[:, 0], logits_TE.gather(1, choice_T[:, None]).squeeze(1)], dim=-1)
        w_T2 = pair_T2.softmax(dim=-1)
        one_hot = torch.tensor([1.0, 0.0], device=w_T2.device, dtype=w_T2.dtype)
        w_T2 = torch.where(anchor_only[:, None], one_hot, w_T2)
        idx_T2 = torch.stack([torch.zeros_like(choice_T), torch.where(anchor_only, 0, choice_T)], dim=-1)
        probs_TE = torch.zeros_like(logits_TE).scatter_add(1, idx_T2, w_T2)
        return logits_TE, probs_TE, w_T2, idx_T2


class GroupedExperts(nn.Module):
    """SwiGLU experts stacked `[E, d_ff, d_model]` / `[E, d_model, d_ff]`.

    `freeze_leading(n)` moves the first n experts into separate parameters with
    requires_grad=False (`gate_proj_frozen`, ...), so frozen experts carry no gradient and no
    optimizer state; `canonical_state_dict` stitches them back into `[E, ...]`.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, impl: str = "auto"):
        super().__init__()
        self.num_experts, self.impl = num_experts, impl
        self.num_frozen = 0
        self.gate_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.up_proj = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        # Opt-in capture point for DP book-keeping clipping (train/ghost.py): a list makes forward
        # run the per-expert loop and append, per trainable expert, (slot, x rows, gate and up
        # pre-activations, SwiGLU intermediate, output): tensors autograd keeps for the backward
        # anyway, from which per-unit weight gradients are assembled without recomputing them.
        self.capture: list | None = None
        # Opt-in with `capture`: a tag per input row (its DP unit), set by a forward pre-hook before
        # the expert-parallel dispatch, which then moves each row's tag with the row (parallel/expert.py)
        self.row_tags: torch.Tensor | None = None

    # --- frozen slots --------------------------------------------------------------------------
    def freeze_leading(self, n: int) -> None:
        """Freeze experts [0, n) (the anchor is expert 0); idempotent for the same n."""
        self.unfreeze()
        if not 0 <= n <= self.num_experts:
            raise ValueError(f"cannot freeze {n} of {self.num_experts} experts")
        if n == 0:
            return
        for name in EXPERT_WEIGHTS:
            full = getattr(self, name).data
            delattr(self, name)
            self.register_parameter(name + FROZEN_SUFFIX, nn.Parameter(full[:n].clone(), requires_grad=False))
            self.register_parameter(name, nn.Parameter(full[n:].clone(), requires_grad=True))
        self.num_frozen = n

    def unfreeze(self) -> None:
        if self.num_frozen == 0:
            return
        for name in EXPERT_WEIGHTS:
            full = torch.cat([getattr(self, name + FROZEN_SUFFIX).data, getattr(self, name).data])
            delattr(self, name + FROZEN_SUFFIX)
            delattr(self, name)
            self.register_parameter(name, nn.Parameter(full))
        self.num_frozen = 0

    def local(self, name: str) -> torch.Tensor:
        """The weight this process computes with. Expert/tensor-parallel styles (flexmoe.parallel)
        turn the weights into DTensors; the math here always runs on this rank's shard, and the
        styles' hooks around forward() move tokens and partial sums."""
        w = getattr(self, name)
        return w.to_local() if hasattr(w, "to_local") else w

    def slot(self, name: str, e: int) -> torch.Tensor:
        if e < self.num_frozen:
            return self.local(name + FROZEN_SUFFIX)[e]
        return self.local(name)[e - self.num_frozen]

    # --- compute -------------------------------------------------------------------------------
    def _use_grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "loop":
            return False
        # grouped_mm runs on CPU in fp32 and bf16 and on CUDA in bf16; its kernels need every
        # row stride 16-byte aligned: d_model and the local d_ff multiples of 8 (bf16) or 4 (fp32).
        d_ff = self.local("gate_proj_frozen" if self.num_frozen else "gate_proj").shape[1]
        aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], d_ff))
        runs = hasattr(F, "grouped_mm") and aligned and (
            x.dtype == torch.bfloat16 or (x.dtype == torch.float32 and not x.is_cuda))
        if self.impl == "grouped":
            if not runs:
                raise ValueError("model.moe_impl=grouped needs torch.nn.functional.grouped_mm, bf16 (or fp32 on "
                                 "CPU) and d_model, d_ff multiples of 16 bytes; use auto")
            return True
        # auto: only on CUDA. On CPU fp32 grouped_mm measured up to 10x slower than the loop
        # (4 experts, d 256, d_ff 512, 2k tokens); in CPU bf16 both are slow.
        return runs and x.is_cuda

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """`x_ND` holds tokens sorted by expert; `counts_E[e]` of them belong to expert e.

        Under expert parallelism the hooks hand in this rank's experts only: the frozen slots
        (replicated on every rank) first, then the local part of the trainable stack."""
        # the grouped GEMMs' intermediates live inside one autograd.Function: a capture needs the loop's
        if self.capture is None and self._use_grouped(x_ND):
            return self._grouped(x_ND, counts_E)
        outs = []
        # An expert without tokens still runs (on zero rows, at no cost) so every weight gets a
        # gradient, zero or not, on every rank: FSDP's reduce-scatter and the expert-parallel
        # all-to-all need all ranks to agree on which tensors take part.
        for e, x_e in enumerate(torch.split(x_ND, counts_E.tolist())):
            # as_compute: a frozen slot kept in its stored dtype (bf16) computes as its fp32 copy would
            w = {n: as_compute(self.slot(n, e), x_e) for n in EXPERT_WEIGHTS}
            g, u = F.linear(x_e, w["gate_proj"]), F.linear(x_e, w["up_proj"])
            h = F.silu(g) * u
            outs.append(F.linear(h, w["down_proj"]))
            if self.capture is not None and e >= self.num_frozen:
                self.capture.append((e - self.num_frozen, x_e, g, u, h, outs[-1]))
        if not outs:
            return x_ND.new_zeros(x_ND.shape)
        return torch.cat(outs)

    def _grouped(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        trainable = [self.local(n) for n in EXPERT_WEIGHTS]
        frozen = [self.local(n + FROZEN_SUFFIX) if self.num_frozen else None for n in EXPERT_WEIGHTS]
        if trainable[0].shape[0] == 0:  # an ep rank without trainable experts
            trainable = [None] * 3
        return _TwoStackSwiGLU.apply(x_ND, counts_E, self.num_frozen, *frozen, *trainable)


class _TwoStackSwiGLU(torch.autograd.Function):
    """SwiGLU experts as grouped GEMMs over two stacks, each on its own weights: the frozen slots
    (rows `[0, n_stay)` of x, experts `[0, nf)`) and the trainable ones (the remaining rows).

    Why a hand-written backward: concatenating the stacks every step would copy every frozen
    weight (and keep the copy for backward) and make autograd compute their weight gradients;
    two autograd'ed GEMMs would each keep N-row activations. Here backward computes weight
    gradients for the trainable stack only, and forward keeps x, gate and up (N rows each),
    recomputing silu(gate) * up: less than the per-expert loop keeps.

    No host synchronisation: the frozen slots' row count stays a device scalar. grouped_mm
    groups start at row 0 and leave rows past the last group unwritten (garbage), so the
    trainable stack runs on x rotated by n_stay (a gather with device-side indices) and every
    result is merged by a row mask, which also drops the garbage rows.
    """

    @staticmethod
    def forward(ctx, x_ND, counts_E, nf, gate_f, up_f, down_f, gate_t, up_t, down_t):
        weights = [w if w is None else w.to(x_ND.dtype) for w in (gate_f, up_f, down_f, gate_t, up_t, down_t)]
        seg = _Segments(x_ND.shape[0], counts_E, nf, x_ND.device)
        g_NF = seg.mm(x_ND, weights[0], weights[3], transpose=True)
        u_NF = seg.mm(x_ND, weights[1], weights[4], transpose=True)
        y_ND = seg.mm(F.silu(g_NF) * u_NF, weights[2], weights[5], transpose=True)
        ctx.nf = nf
        ctx.save_for_backward(x_ND, counts_E, g_NF, u_NF, *weights)
        ctx.param_dtypes = [None if w is None else w.dtype for w in (gate_t, up_t, down_t)]
        return y_ND

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy_ND):
        x_ND, counts_E, g_NF, u_NF, gate_f, up_f, down_f, gate_t, up_t, down_t = ctx.saved_tensors
        seg = _Segments(x_ND.shape[0], counts_E, ctx.nf, x_ND.device)
        # grouped_mm takes no stride-0 (expanded) operand; an empty one (an ep rank that got no
        # tokens) counts as contiguous whatever its strides, so it is rebuilt
        dy_ND = dy_ND.contiguous() if dy_ND.numel() else dy_ND.new_zeros(dy_ND.shape)
        silu_NF = F.silu(g_NF)
        dh_NF = seg.mm(dy_ND, down_f, down_t, transpose=False)
        # the same kernels autograd runs for silu(g) * u, so the loop's gradients are matched
        dg_NF = torch.ops.aten.silu_backward(dh_NF * u_NF, g_NF)
        du_NF = dh_NF * silu_NF
        dx_ND = seg.mm(dg_NF, gate_f, gate_t, transpose=False) + seg.mm(du_NF, up_f, up_t, transpose=False)
        # weight gradients of the trainable stack only: [G, out, in] = grad^T @ input per group
        grads = [None, None, None]
        if gate_t is not None:
            needs = ctx.needs_input_grad[6:9]
            pairs = ((dg_NF, x_ND), (du_NF, x_ND), (dy_ND, silu_NF * u_NF))
            for i, (grad_NO, inp_NI) in enumerate(pairs):
                if needs[i]:
                    grads[i] = seg.weight_grad(grad_NO, inp_NI).to(ctx.param_dtypes[i])
        return (dx_ND if ctx.needs_input_grad[0] else None), None, None, None, None, None, *grads


class _Segments:
    """Row bookkeeping for _TwoStackSwiGLU, all on the device: rows `[0, n_stay)` belong to the
    first `nf` experts, the rest (rotated to the front for their GEMMs) to the others."""

    def __init__(self, N: int, counts_E: torch.Tensor, nf: int, device: torch.device):
        self.N, self.nf = N, nf
        self.offs_f = counts_E[:nf].cumsum(0, dtype=torch.int32)
        self.offs_t = counts_E[nf:].cumsum(0, dtype=torch.int32)
        self.n_stay = counts_E[:nf].sum()
        row_N = torch.arange(N, device=device)
        self.stay_N1 = (row_N < self.n_stay)[:, None]
        self.to_front_N = (row_N + self.n_stay) % max(N, 1)  # trainable rows first
        self.back_N = (row_N - self.n_stay) % max(N, 1)

    def mm(self, a_NK, w_f, w_t, *, transpose: bool) -> torch.Tensor:
        """Each row of `a_NK` times its expert's weight (`w^T` with `transpose`), both stacks."""
        out_f = out_t = None
        if w_f is not None:
            out_f = F.grouped_mm(a_NK, w_f.transpose(-2, -1) if transpose else w_f, offs=self.offs_f)
        if w_t is not None:
            a_rot = a_NK.index_select(0, self.to_front_N) if self.nf else a_NK
            out_t = F.grouped_mm(a_rot, w_t.transpose(-2, -1) if transpose else w_t, offs=self.offs_t)
            if self.nf:
                out_t = out_t.index_select(0, self.back_N)
        if out_f is None:
            return out_t
        if out_t is None:
            return torch.where(self.stay_N1, out_f, 0)
        return torch.where(self.stay_N1, out_f, out_t)

    def weight_grad(self, grad_NO: torch.Tensor, inp_NI: torch.Tensor) -> torch.Tensor:
        """`[G, O, I]`: per trainable expert, grad^T @ input over its rows (others ignored)."""
        if self.nf:
            grad_NO, inp_NI = grad_NO.index_select(0, self.to_front_N), inp_NI.index_select(0, self.to_front_N)
        return F.grouped_mm(grad_NO.t(), inp_NI, offs=self.offs_t)


class MoE(nn.Module):
    """Router + dropless dispatch + experts; records its routing and auxiliary losses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.num_experts
        self.lb_loss_weight, self.z_loss_weight = cfg.lb_loss_weight, cfg.z_loss_weight
        self.router = Router(cfg.d_model, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob, cfg.router_bias,
                             cfg.routing, cfg.router_cosine_temp)
        self.experts = GroupedExperts(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.moe_impl)
        self.record_routing = False
        self.last_routing: Routing | None = None
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x_BSD: torch.Tensor, expert_mask: torch.Tensor | None = None,
                choice_BS: torch.Tensor | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(-1, D)
        choice_T = choice_BS.reshape(-1) if choice_BS is not None else None
        logits_TE, probs_TE, top_w_TK, top_idx_TK = self.router(x_TD, expert_mask, choice_T)
        T, K = top_idx_TK.shape

        # Sort token copies by expert so every expert sees one contiguous block (dropless).
        flat_idx = top_idx_TK.reshape(-1)
        order = torch.argsort(flat_idx, stable=True)
        token_of = order // K
        counts_E = torch.bincount(flat_idx, minlength=self.num_experts)
        y_ND = self.experts(x_TD[token_of], counts_E)
        y_ND = y_ND * top_w_TK.reshape(-1)[order, None].to(y_ND.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_of, y_ND.to(x_TD.dtype))

        if self.record_routing:
            self.last_routing = Routing(probs_TE.detach(), top_idx_TK.detach(), top_w_TK.detach())
        if self.training and (self.lb_loss_weight > 0 or self.z_loss_weight > 0):
            self.last_aux_loss = self._aux_loss(logits_TE, probs_TE, counts_E, T * K)
        else:
            self.last_aux_loss = None
        return out_TD.view(B, S, D)

    def _aux_loss(self, logits_TE, probs_TE, counts_E, num_assignments) -> torch.Tensor:
        loss = logits_TE.new_zeros(())
        if self.lb_loss_weight > 0:
            # Switch-style balance: E * sum_e (share of assignments to e) * (mean prob of e).
            frac_E = counts_E.float() / max(num_assignments, 1)
            loss = loss + self.lb_loss_weight * self.num_experts * (frac_E * probs_TE.mean(0)).sum()
        if self.z_loss_weight > 0:
            finite = logits_TE.masked_fill(torch.isinf(logits_TE), -1e4)
            loss = loss + self.z_loss_weight * torch.logsumexp(finite, dim=-1).pow(2).mean()
        return loss


def canonical_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stitch split frozen expert slots back into `[E, ...]` tensors (the on-disk layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in sd.items():
        if key.endswith(FROZEN_SUFFIX):
            continue
        frozen = sd.get(key + FROZEN_SUFFIX)
        out[key] = torch.cat([frozen, t]) if frozen is not None else t
    return out
