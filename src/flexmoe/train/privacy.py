"""DP-SGD for an owner's expert: per-sample clipping, Gaussian noise on the trainable coordinates
only, Poisson sampling of training windows, and a privacy accountant.

The step itself runs inside the ordinary trainer (`flexmoe train privacy.enabled=true`; see
train/private_step.py): it starts from `init_from` (the owner's branched model), applies
`stage.freeze` (expert_anchor: the owner's expert FFN and router row train, everything else is
frozen) and writes `out_dir/final` with a `dp` record in flexmoe.json that `flexmoe package`
copies into the expert package's manifest.

Per-window gradients: neither opacus' per-layer hooks nor `torch.func.vmap` see per-sample
tensors inside the MoE (the dispatch sorts the batch's tokens by expert and splits them by
data-dependent counts). `privacy.clipping=book_keeping` (the default where the model qualifies)
carries each token's window through the dispatch instead and assembles per-window norms and the
clipped sum from one batched forward and backward (train/ghost.py). The reference,
`per_unit_backward`, runs one backward per window: exact for every model, B small backward
passes instead of one batched one; the tests hold the two equal. The accounting is opacus' (extra `dp`):
its RDP accountant by default, its PRV accountant with `privacy.accountant=prv`
(train/dp_accounting.py); without opacus, `privacy.enabled=true` is refused in one line.

The privacy unit is one training window (`data.seq_len + 1` tokens): a document spanning k
windows is protected with group privacy (roughly k times epsilon), not epsilon.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flexmoe.config.train import ACCOUNTANTS, CLIPPING, PrivacyConfig, to_typed  # noqa: F401  (re-exported)
from flexmoe.io.keys import router_weight_key
from flexmoe.io.log import get_logger
from flexmoe.train.dp_accounting import (  # noqa: F401  (re-exported)
    DEFAULT_ORDERS, OpacusAccountant, RDPAccountant, calibrate_noise, epsilon_after, epsilon_from_rdp, make_accountant,
    max_steps_within, rdp_sampled_gaussian, require_opacus)

log = get_logger(__name__)

# --- per-sample clipping and noise ---------------------------------------------------------------

def trainable_masks(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """Per parameter, a 0/1 mask of the coordinates that really train (None: all of them).

    Router weights under expert_anchor have their leading rows frozen by a gradient hook; the
    mask keeps those rows out of the clipping norm and, above all, out of the noise."""
    from flexmoe.parallel.grad import ROW_MASK

    masks: list[torch.Tensor | None] = []
    for p in params:
        n = getattr(p, ROW_MASK, 0)
        if n:
            keep = torch.ones(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
            keep[:n] = 0
            masks.append(keep)
        else:
            masks.append(None)
    return masks


def sample_loss(model, window_1S: torch.Tensor, expert_mask: torch.Tensor | None = None,
                mask_1S: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token loss of one window `[1, S+1]` (plus the model's auxiliary loss, if any): the mean
    over its targets, or with `mask_1S` (a padded document window) the sum over the kept targets
    divided by S, so every trained token weighs 1/S whatever its window's length."""
    out = model(window_1S[:, :-1], expert_mask)
    logits = out.logits.float()
    targets = window_1S[:, 1:].reshape(-1)
    if mask_1S is None:
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    else:
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
        loss = (per * mask_1S.reshape(-1).to(per.dtype)).sum() / mask_1S.shape[-1]
    return loss + out.aux_loss if out.aux_loss is not None else loss


def clipped_sample_grads(model, batch_BS: torch.Tensor, params: Sequence[torch.nn.Parameter], max_grad_norm: float,
                         masks: Sequence[torch.Tensor | None] | None = None,
                         expert_mask: torch.Tensor | None = None,
                         unit_of_window: Sequence[int] | torch.Tensor | None = None,
                         loss_mask: torch.Tensor | None = None) -> Iterator[tuple[list[torch.Tensor], float, float]]:
    """The reference: per privacy unit of the batch (each window, or the windows `unit_of_window`
    gives one id), one backward per window, summed over the unit's windows: (that gradient scaled
    to norm <= max_grad_norm, its norm before clipping, the mean loss of its windows). Frozen
    coordinates (masks) are zero and do not count in the norm. Units come in id order."""
    masks = list(masks) if masks is not None else [None] * len(params)
    B = batch_BS.shape[0]
    ids = list(range(B)) if unit_of_window is None else [int(u) for u in unit_of_window]
    for unit in sorted(set(ids)):
        out = [torch.zeros_like(p) for p in params]
        losses = []
        for b in (b for b in range(B) if ids[b] == unit):
            loss = sample_loss(model, batch_BS[b:b + 1], expert_mask,
                               loss_mask[b:b + 1] if loss_mask is not None else None)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for o, g, m in zip(out, grads, masks):
                if g is not None:
                    o.add_(g.detach() * m if m is not None else g.detach())
            losses.append(float(loss.detach()))
        norm = float(torch.sqrt(sum((g.double().pow(2).sum() for g in out), torch.zeros((), dtype=torch.float64))))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))
        yield [g * scale for g in out], norm, float(np.mean(losses))


def private_gradient(model, batch_BS: torch.Tensor, params: Sequence[torch.nn.Parameter], *, max_grad_norm: float,
                     noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                     masks: Sequence[torch.Tensor | None] | None = None,
                     unit_of_window: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
                     clipping: str = "auto", tp: int = 1) -> tuple[list[torch.Tensor], dict[str, float]]:
    """(sum of clipped per-unit gradients + N(0, (sigma C)^2) on trainable coordinates) divided
    by the expected batch size (in units): Poisson batches vary in size, and dividing by the
    realised size would leak it.

    `unit_of_window` `[B]`: each window's privacy unit, ids 0..U-1 (None: every window its own);
    `loss_mask` `[B, S]`: targets that train (padded document windows; see `sample_loss`).
    `clipping`: `book_keeping` (train/ghost.py: one forward and one backward for the batch),
    `per_unit_backward` (the reference: one backward per window), or `auto` (book-keeping where
    the model qualifies, `ghost.supported`).

    Under torch.distributed (the trainer's mesh: ranks `dp_rank * tp + tp_rank`) every
    data-parallel rank passes its own windows, whole units only, and the `tp` ranks of one
    data-parallel group the same ones. Units get ids global to the step (the data-parallel ranks'
    in rank order); per-unit squared norms are summed over the ranks holding different pieces of
    the gradient (FSDP: whole tensors per rank's own units; ep: an expert's rows on its rank,
    whatever rank they came from; tp: d_ff slices, the replicated router counted on one tp rank),
    the clipped sums are added over ranks, the noise (the same draw on every rank, so the one a
    single process would add) is added once, and each parameter gets its gradient in its own
    layout (a sharded DTensor's local shard). The reference runs on every layout too: one
    forward and backward per window of the global batch on every rank (the window's own
    data-parallel group computes it, the others run a zero-weighted window for the collectives).
    The stats are the global batch's."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, distribute_tensor

    from flexmoe.train import ghost

    if clipping not in CLIPPING:
        raise ValueError(f"privacy.clipping={clipping!r} is not {'|'.join(CLIPPING)}")
    masks = list(masks) if masks is not None else [None] * len(params)
    B = batch_BS.shape[0]
    units = torch.arange(B) if unit_of_window is None else torch.as_tensor(unit_of_window, dtype=torch.long).cpu()
    num_units = int(units.max()) + 1 if B else 0
    why_not = ghost.supported(model, params)
    if clipping == "book_keeping" and why_not:
        raise ValueError(f"privacy.clipping=book_keeping: {why_not}; use privacy.clipping=per_unit_backward")
    method = "per_unit_backward" if clipping == "per_unit_backward" or why_not else "book_keeping"
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    dp_rank, dp_size, tp_rank = rank // tp, world // tp, rank % tp
    offset, total_units = 0, num_units
    if world > 1:  # global unit ids: the data-parallel ranks' units in rank order
        counts = torch.zeros(dp_size, dtype=torch.long, device=batch_BS.device)
        if tp_rank == 0:
            counts[dp_rank] = num_units
        dist.all_reduce(counts)
        offset, total_units = int(counts[:dp_rank].sum()), int(counts.sum())
    if world > 1 and method == "per_unit_backward":
        total, norms, losses = _reference_on_ranks(model, batch_BS, units + offset, params, max_grad_norm, masks,
                                                   loss_mask, dp_rank=dp_rank, dp_size=dp_size, tp_rank=tp_rank)
    elif method == "book_keeping" and (B or world > 1):
        dummy = B == 0  # every rank takes part in the sharded forward, with or without windows
        if dummy:  # a zero-weighted window: every gradient it makes is 0
            batch_BS = batch_BS.new_zeros(1, batch_BS.shape[1])
            loss_mask = torch.zeros(1, batch_BS.shape[1] - 1, device=batch_BS.device)
            units = torch.zeros(1, dtype=torch.long)
        gunits = units + offset if not dummy else units
        total, norms_t, losses_t = ghost.book_keeping_grads(model, batch_BS, gunits, max(total_units, 1), params,
                                                            max_grad_norm, masks, loss_mask=loss_mask,
                                                            count_router=tp_rank == 0)
        # per unit: its windows' mean loss (as the reference) and whether it has any windows
        loss_U = torch.zeros(2, max(total_units, 1), dtype=torch.float64, device=batch_BS.device)
        if not dummy and tp_rank == 0:
            for u in range(num_units):
                if bool((units == u).any()):
                    loss_U[:, u + offset] = torch.stack([losses_t[units == u].double().mean(), loss_U.new_ones(())])
        if world > 1:
            for t in total:
                dist.all_reduce(t)
            dist.all_reduce(loss_U)
        present = [u for u in range(total_units) if loss_U[1, u] > 0]
        norms = [float(norms_t[u]) for u in present]
        losses = [float(loss_U[0, u]) for u in present]
    else:
        total = [torch.zeros_like(p) for p in params]
        norms, losses = [], []
        for grads, norm, loss in clipped_sample_grads(model, batch_BS, params, max_grad_norm, masks,
                                                      unit_of_window=units.tolist(), loss_mask=loss_mask):
            for t, g in zip(total, grads):
                t.add_(g)
            norms.append(norm)
            losses.append(loss)
    std = noise_multiplier * max_grad_norm
    for t, m in zip(total, masks):
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, t.dtype) * std
        t.add_(noise * m if m is not None else noise).div_(expected_batch_size)
    total = [distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor)
             and not isinstance(t, DTensor) else t for p, t in zip(params, total)]
    stats = {"batch_size": float(len(norms)), "loss": float(np.mean(losses)) if losses else float("nan"),
             "grad_norm_median": float(np.median(norms)) if norms else 0.0,
             "clipped_fraction": float(np.mean([n > max_grad_norm for n in norms])) if norms else 0.0,
             "clipping": method}
    return total, stats


def _reference_on_ranks(model, batch_BS: torch.Tensor, unit_B: torch.Tensor, params, max_grad_norm: float, masks,
                        loss_mask: torch.Tensor | None, *, dp_rank: int, dp_size: int, tp_rank: int
                        ) -> tuple[list[torch.Tensor], list[float], list[float]]:
    """The reference on any layout: (clipped sum as full tensors, the same on every rank; per-unit
    norms; per-unit losses), all of the global batch. One ordinary forward and backward per window
    of the global batch, on every rank in the same order: the ranks of the window's data-parallel
    group run it, the others a window weighted 0 (the sharded forward and backward are collective).
    Each parameter's gradient is then that one window's (FSDP's mean over data-parallel ranks is
    undone), gathered whole on every rank; units are summed, clipped and added as in
    `clipped_sample_grads`."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    world = dist.get_world_size()
    plan: list = [None] * world
    dist.all_gather_object(plan, (dp_rank, tp_rank, unit_B.tolist()))
    ids_of = {r: ids for r, t, ids in plan if t == 0}  # each data-parallel group's windows' units
    undo = float(dp_size) if isinstance(model, FSDPModule) else 1.0  # FSDP divides by the data-parallel size
    S1 = batch_BS.shape[1]
    idle = batch_BS.new_zeros(1, S1)
    total = [torch.zeros(p.shape, dtype=p.dtype, device=batch_BS.device) for p in params]
    norms, losses = [], []
    for grp in range(dp_size):
        ids = ids_of[grp]
        for unit in sorted(set(ids)):
            acc = [torch.zeros_like(t) for t in total]
            unit_losses = []
            for b in (b for b in range(len(ids)) if ids[b] == unit):
                if grp == dp_rank:
                    loss = sample_loss(model, batch_BS[b:b + 1], None, loss_mask[b:b + 1] if loss_mask is not None
                                       else None)
                    loss.backward()
                    unit_losses.append(float(loss.detach()))
                else:
                    (sample_loss(model, idle) * 0).backward()
                for a, p, m in zip(acc, params, masks):
                    g = p.grad
                    if g is not None:
                        g = g.full_tensor() if isinstance(g, DTensor) else g
                        a.add_(g * undo * m if m is not None else g * undo)
                    p.grad = None
            norm = float(torch.sqrt(sum((g.double().pow(2).sum() for g in acc), torch.zeros((), dtype=torch.float64))))
            scale = min(1.0, max_grad_norm / (norm + 1e-6))
            for t, a in zip(total, acc):
                t.add_(a * scale)
            norms.append(norm)
            losses.append(float(np.mean(unit_losses)) if unit_losses else None)
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (dp_rank, tp_rank, losses))
    by_group = {r: ls for r, t, ls in gathered if t == 0}
    k, out = 0, []
    for grp in range(dp_size):  # each unit's loss from its own group
        n = len(set(ids_of[grp]))
        out += by_group[grp][k:k + n]
        k += n
    return total, norms, out


def poisson_indices(num_windows: int, sample_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Each window independently with probability q: a Binomial(N, q) size, then a uniform subset
    of that size (the same distribution, without drawing N uniforms per step)."""
    k = int(rng.binomial(num_windows, sample_rate))
    return np.sort(rng.choice(num_windows, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


# --- the training entry point --------------------------------------------------------------------

def privacy_config_of(cfg: Any, privacy: PrivacyConfig | None = None) -> PrivacyConfig:
    """`privacy` if given, else `cfg.privacy` (a dataclass or a Hydra node), validated."""
    src = privacy if privacy is not None else getattr(cfg, "privacy", None)
    if src is None:
        raise ValueError("no privacy settings: pass PrivacyConfig(...) or set privacy.* in the run config")
    src = to_typed(PrivacyConfig, src, "privacy")
    src.validate()
    if src.enabled:
        require_opacus()
    return src


@torch.no_grad()
def nonprivate_owner_statistics(model, frozen_router_rows: int, private_profile: bool = False) -> list[str]:
    """Tensors of the starting model that the owner filled from its data outside DP-SGD: non-zero
    trainable router rows (the router embedding), owner document centroids and n-gram profiles
    (unless `private_profile`: made by `router-embed --dp-epsilon`, with a budget of its own that
    the package adds to the training's)."""
    found = []
    if frozen_router_rows:
        for i, m in enumerate(model.moe_layers()):
            if bool(m.router.weight[frozen_router_rows:].ne(0).any()):
                found.append(f"{router_weight_key(i)} rows {frozen_router_rows}+ (router embedding)")
        centroids = getattr(model, "domain_centroids", None)
        if centroids is not None and bool(centroids[frozen_router_rows:].ne(0).any()):
            found.append("domain_centroids (document routing centroid)")
        profiles = getattr(model, "domain_ngrams", None)
        if profiles is not None and not private_profile and bool(profiles[frozen_router_rows:].ne(0).any()):
            found.append("domain_ngrams (document routing n-gram profile)")
    return found
