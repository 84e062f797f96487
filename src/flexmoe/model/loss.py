"""Cross-entropy of the LM head without materialising the logits.

`[tokens, vocab]` logits are the largest activation of a training step (2k tokens of a 100k
vocabulary: 0.8 GB in fp32, kept by cross-entropy for backward, plus its fp32 copy). Here the
tokens go through the head in chunks; each chunk's logits live only while its loss is taken,
and backward recomputes them (one chunk at a time) from the saved hidden states: one more GEMM
of the head's three, for one chunk of logits in memory instead of three copies of all of them
(logits, their fp32 copy, the softmax kept for backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Tokens per chunk: a few hundred keeps each chunk's GEMM large enough to run at full speed on
# a GPU, while a vocabulary of 50-100k keeps each chunk's logits at 50-100 MB in fp32.
CHUNK_TOKENS = 256
# Small vocabularies: chunks of up to this many logits, so tiny models do not pay per-chunk
# overhead (2^22 fp32 logits = 16 MiB).
CHUNK_ELEMENTS = 1 << 22


def chunk_tokens_for(vocab_size: int) -> int:
    """Default tokens per chunk: CHUNK_TOKENS, more when that holds few logits."""
    return max(CHUNK_TOKENS, CHUNK_ELEMENTS // max(vocab_size, 1))


def _compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's when it is on (as for `lm_head(h)`)."""
    dev = h.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `h @ W.T`, chunk by chunk; backward recomputes each chunk's
    logits and turns them into their gradient in place (softmax minus one-hot), so one chunk
    of fp32 logits is the most it holds. The per-token loss gradient carries mask and
    reduction, so this function needs to know neither."""

    @staticmethod
    def forward(ctx, h_ND, weight_VD, targets_N, ignore_index: int, chunk: int):
        dtype = _compute_dtype(h_ND)
        w_VD = weight_VD.to(dtype)
        ce_N = torch.empty(h_ND.shape[0], device=h_ND.device, dtype=torch.float32)
        lse_N = torch.empty_like(ce_N)
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, h_ND.shape[0], chunk):
                logits_CV = F.linear(h_ND[s:s + chunk].to(dtype), w_VD).float()
                t_C = targets_N[s:s + chunk]
                keep_C = t_C != ignore_index
                picked_C = logits_CV.gather(1, torch.where(keep_C, t_C, 0)[:, None]).squeeze(1)
                # logsumexp in place: torch.logsumexp would hold a second chunk of logits
                max_C = logits_CV.amax(dim=-1)
                lse_C = logits_CV.sub_(max_C[:, None]).exp_().sum(dim=-1).log_().add_(max_C)
                ce_N[s:s + chunk] = torch.where(keep_C, lse_C - picked_C, 0.0)
                lse_N[s:s + chunk] = lse_C
                del logits_CV  # before the next chunk's GEMM allocates its logits
        ctx.save_for_backward(h_ND, weight_VD, targets_N, lse_N)
        ctx.ignore_index, ctx.chunk, ctx.dtype = ignore_index, chunk, dtype
        return ce_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_ce_N):
        h_ND, weight_VD, targets_N, lse_N = ctx.saved_tensors
        w_VD = weight_VD.to(ctx.dtype)
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h_ND = torch.empty_like(h_ND) if need_h else None
        # fp32 accumulator over chunks: bf16 partial sums would round at every chunk
        grad_w_VD = torch.zeros(weight_VD.shape, device=weight_VD.device, dtype=torch.float32) if need_w else None
        with torch.autocast(h_ND.device.type, enabled=False):  # dtypes as in forward, set by hand
            for s in range(0, h_ND.shape[0], ctx.chunk):
                grad_h_ND, grad_w_VD = _backward_chunk(ctx, s, h_ND, w_VD, targets_N, lse_N, grad_ce_N,
                                                       grad_h_ND, grad_w_VD)
        if need_w:
            grad_w_VD = grad_w_VD.to(weight_VD.dtype)
        return grad_h_ND, grad_w_VD, None, None, None


def _backward_chunk(ctx, s, h_ND, w_VD, targets_N, lse_N, grad_ce_N, grad_h_ND, grad_w_VD):
    """Adds chunk `[s, s + chunk)`'s share of the input and weight gradients."""
    dtype, chunk = ctx.dtype, ctx.chunk
    h_CD = h_ND[s:s + chunk].to(dtype)
    t_C = targets_N[s:s + chunk]
    keep_C = t_C != ctx.ignore_index
    # d ce / d logits = softmax - one_hot(target), scaled by this token's loss gradient; built in
    # the recomputed logits' buffer, so the chunk holds one [C, V] fp32 tensor.
    g_CV = F.linear(h_CD, w_VD).float().sub_(lse_N[s:s + chunk, None]).exp_()
    g_CV.scatter_add_(1, torch.where(keep_C, t_C, 0)[:, None], g_CV.new_full((len(t_C), 1), -1.0))
    g_CV.mul_(torch.where(keep_C, grad_ce_N[s:s + chunk], 0.0)[:, None])
    g_CV = g_CV.to(dtype)  # the head's GEMMs in its dtype, as autograd through lm_head runs them
    if grad_h_ND is not None:
        grad_h_ND[s:s + chunk] = (g_CV @ w_VD).to(grad_h_ND.dtype)
    if grad_w_VD is not None:
        if g_CV.dtype == torch.float32:
            grad_w_VD.addmm_(g_CV.t(), h_CD)
        else:  # no mixed-dtype addmm on every backend: a [V, D] temporary in the compute dtype
            grad_w_VD += g_CV.t() @ h_CD
    return grad_h_ND, grad_w_VD


def linear_cross_entropy(
    h_ND: torch.Tensor,
    weight_VD: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    loss_mask_N: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of `h_ND @ weight_VD.T` against `targets_N`, in fp32, chunk by chunk.

    Leading dimensions of `h` and `targets` (e.g. batch, sequence) are flattened. Targets equal
    to `ignore_index` count neither in the loss nor in the mean. `loss_mask_N` weighs each
    token's loss (0/1 for SFT's trained targets); the mean then divides by its sum (at least 1).
    reduction: "mean", "sum" or "none" (per-token losses, fp32, shaped like `targets`).
    Equal to `F.cross_entropy(F.linear(h, weight).float(), targets)` with the same options.
    """
    if reduction not in ("mean", "sum", "none"):  # before the GEMMs, not after
        raise ValueError(f"reduction={reduction!r} is not mean|sum|none")
    out_shape = targets_N.shape
    h_ND = h_ND.reshape(-1, h_ND.shape[-1])
    targets_N = targets_N.reshape(-1)
    if h_ND.shape[0] != targets_N.shape[0]:
        raise ValueError(f"{h_ND.shape[0]} hidden states for {targets_N.shape[0]} targets")
    chunk = chunk_tokens or chunk_tokens_for(weight_VD.shape[0])
    ce_N = _LinearCrossEntropy.apply(h_ND, weight_VD, targets_N, ignore_index, chunk)
    return _reduce(ce_N, out_shape, targets_N, loss_mask_N, ignore_index, reduction)


def cross_entropy_from_logits(
    logits_NV: torch.Tensor,
    targets_N: torch.Tensor,
    *,
    loss_mask_N: torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> torch.Tensor:
    """`linear_cross_entropy` on logits already computed (a vocab-sharded head under tensor
    parallelism gathers them whole): the same options, the same numbers."""
    V = logits_NV.shape[-1]
    ce_N = F.cross_entropy(logits_NV.float().reshape(-1, V), targets_N.reshape(-1), ignore_index=ignore_index,
                           reduction="none")
    return _reduce(ce_N, targets_N.shape, targets_N.reshape(-1), loss_mask_N, ignore_index, reduction)


def _reduce(ce_N, out_shape, targets_N, loss_mask_N, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} is not mean|sum|none")
    if loss_mask_N is not None:
        mask_N = loss_mask_N.reshape(-1).to(ce_N.dtype)
        ce_N, count = ce_N * mask_N, mask_N.sum()
    else:
        count = (targets_N != ignore_index).sum().to(ce_N.dtype)
    if reduction == "none":
        return ce_N.view(out_shape)
    return ce_N.sum() if reduction == "sum" else ce_N.sum() / count.clamp(min=1.0)
