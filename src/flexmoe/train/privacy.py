"""DP-SGD for an owner's expert: per-sample clipping, Gaussian noise on the trainable coordinates
only, Poisson sampling of training windows, and a privacy accountant.

Entry point: `train_private(cfg)` (one process), which `flexmoe train privacy.enabled=true`
routes to. It starts from `init_from` (the owner's branched model), applies `stage.freeze`
(expert_anchor: the owner's expert FFN and router row train, everything else is frozen) and
writes `out_dir/final` like the trainer does, with a `dp` record in flexmoe.json that
`flexmoe package` copies into the expert package's manifest.

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

import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flexmoe.config.train import ACCOUNTANTS, PrivacyConfig, as_run_config, to_typed  # noqa: F401  (re-exported)
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


def sample_loss(model, window_1S: torch.Tensor, expert_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token loss of one window `[1, S+1]` (plus the model's auxiliary loss, if any)."""
    out = model(window_1S[:, :-1], expert_mask)
    logits = out.logits.float()
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window_1S[:, 1:].reshape(-1))
    return loss + out.aux_loss if out.aux_loss is not None else loss


def clipped_sample_grads(model, batch_BS: torch.Tensor, params: Sequence[torch.nn.Parameter], max_grad_norm: float,
                         masks: Sequence[torch.Tensor | None] | None = None,
                         expert_mask: torch.Tensor | None = None,
                         unit_of_window: Sequence[int] | torch.Tensor | None = None
                         ) -> Iterator[tuple[list[torch.Tensor], float, float]]:
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
            loss = sample_loss(model, batch_BS[b:b + 1], expert_mask)
            grads = torch.autograd.grad(loss, list(params), allow_unused=True)
            for o, g, m in zip(out, grads, masks):
                if g is not None:
                    o.add_(g.detach() * m if m is not None else g.detach())
            losses.append(float(loss.detach()))
        norm = float(torch.sqrt(sum((g.double().pow(2).sum() for g in out), torch.zeros((), dtype=torch.float64))))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))
        yield [g * scale for g in out], norm, float(np.mean(losses))


CLIPPING = ("auto", "book_keeping", "per_unit_backward")


def private_gradient(model, batch_BS: torch.Tensor, params: Sequence[torch.nn.Parameter], *, max_grad_norm: float,
                     noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                     masks: Sequence[torch.Tensor | None] | None = None,
                     unit_of_window: torch.Tensor | None = None,
                     clipping: str = "auto") -> tuple[list[torch.Tensor], dict[str, float]]:
    """(sum of clipped per-unit gradients + N(0, (sigma C)^2) on trainable coordinates) divided
    by the expected batch size (in units): Poisson batches vary in size, and dividing by the
    realised size would leak it.

    `unit_of_window` `[B]`: each window's privacy unit, ids 0..U-1 (None: every window its own).
    `clipping`: `book_keeping` (train/ghost.py: one forward and one backward for the batch),
    `per_unit_backward` (the reference: one backward per window), or `auto` (book-keeping where
    the model qualifies, `ghost.supported`)."""
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
    if B and method == "book_keeping":
        total, norms_t, losses_t = ghost.book_keeping_grads(model, batch_BS, units, num_units, params, max_grad_norm,
                                                            masks)
        present = [u for u in range(num_units) if bool((units == u).any())]
        norms = [float(norms_t[u]) for u in present]
        losses = [float(losses_t[units == u].mean()) for u in present]  # per unit, as the reference
    else:
        total = [torch.zeros_like(p) for p in params]
        norms, losses = [], []
        for grads, norm, loss in clipped_sample_grads(model, batch_BS, params, max_grad_norm, masks,
                                                      unit_of_window=units.tolist()):
            for t, g in zip(total, grads):
                t.add_(g)
            norms.append(norm)
            losses.append(loss)
    std = noise_multiplier * max_grad_norm
    for t, m in zip(total, masks):
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float32).to(t.device, t.dtype) * std
        t.add_(noise * m if m is not None else noise).div_(expected_batch_size)
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


def _private_windows(cfg):
    from flexmoe.data import TokenWindows

    if cfg.data.format != "lm":
        raise ValueError(f"data.format={cfg.data.format} with privacy.enabled=true: DP-SGD trains on token windows "
                         "(data.format=lm) only")
    if len(cfg.data.train) != 1:
        raise ValueError(f"data.train names {sorted(cfg.data.train)}; DP training takes exactly one domain, "
                         "the owner's")
    if cfg.stage.public_mix > 0:
        raise ValueError("stage.public_mix > 0 with privacy.enabled=true: DP training samples only the owner's data; "
                         "set stage.public_mix=0")
    (domain, path), = cfg.data.train.items()
    return domain, TokenWindows(path, cfg.data.seq_len, verify=cfg.data.verify)


def train_private(cfg: Any, privacy: PrivacyConfig | None = None) -> dict[str, Any]:
    """DP-SGD training of one stage in one process; writes `out_dir/final` with a `dp` record.

    Uses from `cfg` (a RunConfig): init_from, stage.freeze, data.train (one domain), data.seq_len,
    data.batch_size (expected Poisson batch), data.val, optim.*, trainer.steps / seed / log_every
    / eval_batches / threads, meta.*, out_dir; and `privacy` (or `cfg.privacy`). optim.grad_clip
    is ignored: per-window clipping at privacy.max_grad_norm replaces it. No mid-run checkpoints:
    resuming would need the accountant's and sampler's state (a restart spends a fresh budget).
    """
    from flexmoe.train.load import load_model
    from flexmoe.train.freeze import PLANS, apply_freeze_plan
    from flexmoe.train.metrics import MetricLogger
    from flexmoe.train.optim import build_optimizer, lr_at

    cfg = as_run_config(cfg)
    pc = privacy_config_of(cfg, privacy)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("privacy.enabled=true trains in one process; launch without torchrun")
    if cfg.trainer.dtype != "fp32":
        raise ValueError(f"trainer.dtype={cfg.trainer.dtype}: DP training runs in fp32; set trainer.dtype=fp32")
    if not cfg.init_from:
        raise ValueError("privacy.enabled=true needs init_from=<the owner's branched model directory>")
    if cfg.stage.freeze not in PLANS:
        raise ValueError(f"stage.freeze={cfg.stage.freeze!r} is not one of {sorted(PLANS)}")
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)

    domain, windows = _private_windows(cfg)
    num_windows = len(windows)
    q = pc.sampling_rate or min(1.0, cfg.data.batch_size / num_windows)
    if pc.delta >= 1 / num_windows:
        raise ValueError(f"privacy.delta={pc.delta:g} must be below 1/{num_windows} (one over the number of "
                         "training windows); lower it")
    sigma = pc.noise_multiplier or calibrate_noise(pc.target_epsilon, pc.delta, q, cfg.trainer.steps, pc.accountant)
    steps = cfg.trainer.steps
    if pc.target_epsilon > 0:
        steps = max_steps_within(pc.target_epsilon, pc.delta, sigma, q, steps, pc.accountant)
        if steps == 0:
            raise ValueError(f"privacy.target_epsilon={pc.target_epsilon} is spent before the first step at "
                             f"noise_multiplier={sigma:.3g}; raise the noise or the target")

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model, mcfg, base_meta = load_model(cfg.init_from)
    apply_freeze_plan(model, PLANS[cfg.stage.freeze])
    dp_profile = bool((base_meta.get("router_embedding") or {}).get("profile_dp"))  # router-embed --dp-epsilon
    owner_stats = nonprivate_owner_statistics(model, PLANS[cfg.stage.freeze].frozen_router_rows, dp_profile)
    if owner_stats and not pc.allow_nonprivate_router_init:
        raise ValueError(f"{cfg.init_from}: {owner_stats[0]} holds statistics of the owner's data computed without "
                         "noise; branch without --router-embedding for a DP expert, or set "
                         "privacy.allow_nonprivate_router_init=true")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    masks = trainable_masks(params)
    optimizer = build_optimizer(model, cfg.optim)
    seed = pc.noise_seed if pc.noise_seed is not None else int.from_bytes(os.urandom(8), "little")
    rng = np.random.default_rng([seed, 1])
    gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2]).integers(2**62)))
    accountant = make_accountant(pc.accountant)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    logger = MetricLogger(out, wandb_cfg=cfg.wandb)
    log.info(f"DP-SGD on {domain}: {num_windows} windows, q={q:.4g}, sigma={sigma:.4g}, "
          f"C={pc.max_grad_norm}, {steps} steps ({cfg.trainer.steps} asked)")

    t0 = time.perf_counter()
    clipping_used = None
    for step in range(steps):
        lr = lr_at(step, steps, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = poisson_indices(num_windows, q, rng)
        batch = torch.from_numpy(windows.windows(idx)).to(device)
        grads, stats = private_gradient(model, batch, params, max_grad_norm=pc.max_grad_norm, noise_multiplier=sigma,
                                        expected_batch_size=q * num_windows, generator=gen, masks=masks,
                                        clipping=pc.clipping)
        if step == 0:
            clipping_used = stats["clipping"]
            log.info(f"per-window clipping: {clipping_used}")
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accountant.step(sigma, q)
        s = step + 1
        if s % cfg.trainer.log_every == 0 or s == steps:
            eps = accountant.epsilon(pc.delta)
            rec = {"step": s, "loss": stats["loss"], "lr": lr, "epsilon": eps, "delta": pc.delta,
                   "batch_size": stats["batch_size"], "clipped_fraction": stats["clipped_fraction"],
                   "grad_norm_median": stats["grad_norm_median"], "seconds": time.perf_counter() - t0}
            logger.log(rec, f"step {s:>6}/{steps}  loss {stats['loss']:.4f}  eps {eps:.3f} (delta {pc.delta:g})  "
                            f"batch {int(stats['batch_size'])}  clipped {stats['clipped_fraction']:.0%}")

    epsilon = accountant.epsilon(pc.delta)
    dp = {"epsilon": epsilon, "delta": pc.delta, "noise_multiplier": sigma, "max_grad_norm": pc.max_grad_norm,
          "sampling_rate": q, "sampling": "poisson", "steps": steps, "steps_asked": cfg.trainer.steps,
          "target_epsilon": pc.target_epsilon or None, "accountant": accountant.name,
          "unit": f"window of {cfg.data.seq_len + 1} tokens", "num_windows": num_windows,
          "expected_batch_size": q * num_windows,
          "excludes": [f"{name} (computed from the owner's data without noise)" for name in owner_stats],
          "noise_seed": "fixed (not private)" if pc.noise_seed is not None else "os.urandom",
          "clipping": clipping_used}
    # The expected count, not the realised one: the realised batch sizes are data about the sampling
    # that the released numbers should not carry (metrics.jsonl, which stays with the owner, has them).
    tokens_seen = round(q * num_windows * steps * cfg.data.seq_len)
    val = _val_losses(model, cfg)
    logger.log({"step": steps, "val_loss": val, "dp": dp},
               f"DP-SGD done: epsilon {epsilon:.3f} at delta {pc.delta:g} after {steps} steps")
    logger.close()
    return _write_final(cfg, model, mcfg, base_meta, tokens_seen, val, dp)


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


def _val_losses(model, cfg) -> dict[str, float]:
    from flexmoe.data import TokenWindows
    from flexmoe.train.perplexity import model_logprobs, perplexity

    model.eval()
    n = cfg.trainer.eval_batches * cfg.data.batch_size
    return {d: math.log(perplexity(model_logprobs(model), TokenWindows(p, cfg.data.seq_len), n))
            for d, p in cfg.data.val.items()}


def _write_final(cfg, model, mcfg, base_meta, tokens_seen, val, dp) -> dict[str, Any]:
    from flexmoe.io.model_dir import save_model_dir
    from flexmoe.io.fingerprint import fingerprint
    from flexmoe.model.moe import canonical_state_dict

    sd = canonical_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    meta = {"kind": base_meta.get("kind", "moe"), "stage": cfg.stage.name, "owner": cfg.meta.owner,
            "domain": cfg.meta.domain, "licence": cfg.meta.licence, "tokens_seen": tokens_seen,
            "tokenizer": base_meta.get("tokenizer") or cfg.tokenizer, "val_loss": val,
            "experts": base_meta.get("experts"), "router_embedding": base_meta.get("router_embedding"), "dp": dp}
    base_fp = base_meta.get("base_fingerprint")
    if base_fp:
        meta["base_fingerprint"] = base_fp
        meta["shared_unchanged"] = fingerprint(sd) == base_fp
    final = save_model_dir(Path(cfg.out_dir) / "final", mcfg, sd, meta, overwrite=True)
    return {"final": str(final), "val_loss": val, "tokens_seen": tokens_seen, **meta}

