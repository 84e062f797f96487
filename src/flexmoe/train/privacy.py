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
                     clipping: str = "auto") -> tuple[list[torch.Tensor], dict[str, float]]:
    """(sum of clipped per-unit gradients + N(0, (sigma C)^2) on trainable coordinates) divided
    by the expected batch size (in units): Poisson batches vary in size, and dividing by the
    realised size would leak it.

    `unit_of_window` `[B]`: each window's privacy unit, ids 0..U-1 (None: every window its own);
    `loss_mask` `[B, S]`: targets that train (padded document windows; see `sample_loss`).
    `clipping`: `book_keeping` (train/ghost.py: one forward and one backward for the batch),
    `per_unit_backward` (the reference: one backward per window), or `auto` (book-keeping where
    the model qualifies, `ghost.supported`).

    Under torch.distributed (data-parallel ranks, FSDP) every rank passes its own windows, whole
    units only; the clipped sums are added over ranks, the noise (the same draw on every rank, so
    the one a single process would add) is added once, and each parameter gets its gradient in its
    own layout (a sharded DTensor's local shard). The stats are the global batch's."""
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
    if world > 1 and method != "book_keeping":
        raise ValueError(f"privacy.clipping={clipping}: {why_not or 'the reference'} runs one process only (its "
                         "per-window passes differ in number between ranks); launch without torchrun")
    dummy = world > 1 and B == 0  # every rank takes part in the sharded forward, with or without windows
    if dummy:
        batch_BS = batch_BS.new_zeros(1, batch_BS.shape[1])
        loss_mask = torch.zeros(1, batch_BS.shape[1] - 1, device=batch_BS.device)
        units, num_units, B = torch.zeros(1, dtype=torch.long), 1, 1
    if B and method == "book_keeping":
        total, norms_t, losses_t = ghost.book_keeping_grads(model, batch_BS, units, num_units, params, max_grad_norm,
                                                            masks, loss_mask=loss_mask)
        present = [] if dummy else [u for u in range(num_units) if bool((units == u).any())]
        norms = [float(norms_t[u]) for u in present]
        losses = [float(losses_t[units == u].mean()) for u in present]  # per unit, as the reference
    else:
        total = [torch.zeros_like(p) for p in params]
        norms, losses = [], []
        for grads, norm, loss in clipped_sample_grads(model, batch_BS, params, max_grad_norm, masks,
                                                      unit_of_window=units.tolist(), loss_mask=loss_mask):
            for t, g in zip(total, grads):
                t.add_(g)
            norms.append(norm)
            losses.append(loss)
    if world > 1:
        for t in total:
            dist.all_reduce(t)
        gathered: list = [None] * world
        dist.all_gather_object(gathered, (norms, losses))
        norms, losses = [n for g in gathered for n in g[0]], [v for g in gathered for v in g[1]]
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
