"""DP-SGD for an owner's expert: per-sample clipping, Gaussian noise on the trainable coordinates
only, Poisson sampling of training windows, and a privacy accountant.

Entry point: `train_private(cfg)` (one process), which `flexmoe train privacy.enabled=true`
routes to. It starts from `init_from` (the owner's branched model), applies `stage.freeze`
(expert_anchor: the owner's expert FFN and router row train, everything else is frozen) and
writes `out_dir/final` like the trainer does, with a `dp` record in flexmoe.json that
`flexmoe package` copies into the expert package's manifest.

Why per-sample gradients are computed one window at a time, not with opacus' hooks or
`torch.func.vmap`: the MoE dispatch sorts tokens of the whole batch by expert and splits them by
data-dependent counts (`counts.tolist()`), so neither a per-layer hook (the batch dimension is
gone inside the experts) nor vmap (no data-dependent sizes) sees per-sample tensors. One
backward per window is exact for every routing policy, costs B small backward passes instead of
one batched one, and keeps memory at one gradient copy. opacus supplies the optional PRV
accountant (`privacy.accountant=prv`, extra `dp`); the default RDP accountant is built in and
checked against opacus' in tests/privacy.

The privacy unit is one training window (`data.seq_len + 1` tokens): a document spanning k
windows is protected with group privacy (roughly k times epsilon), not epsilon.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from flexmoe.config.train import ACCOUNTANTS, PrivacyConfig  # noqa: F401  (re-exported)

# Renyi orders searched for the tightest (epsilon, delta) conversion: fine steps below 11, where
# the optimum sits for epsilon of a few; integers above for small epsilon and large noise.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)) + [80, 128, 256])


# --- accounting: Renyi DP of the Poisson-subsampled Gaussian mechanism ---------------------------

def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log E_{z~N(0,s^2)}[(mu(z)/mu0(z))^alpha] for integer alpha: a finite binomial sum."""
    terms = [math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
             + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
             for k in range(alpha + 1)]
    m = max(terms)
    return m + math.log(sum(math.exp(t - m) for t in terms))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """The same moment for real alpha, by quadrature of
    A - 1 = E_{z~mu0}[((1-q) + q e^{u(z)})^alpha - 1], u(z) = log(mu1(z)/mu0(z)) = (2z-1)/(2 s^2).

    Integrating A - 1 rather than A keeps its tiny value (order q^2) exact to many digits, and the
    trapezoid rule is spectrally accurate for this smooth integrand that decays to e^-72 at both
    ends of the grid (mu0's left tail; on the right mu0 e^{alpha u}, a Gaussian around alpha)."""
    h = sigma / 40
    z = np.arange(-12 * sigma - 1, alpha + 12 * sigma + 1 + h, h)
    u = (2 * z - 1) / (2 * sigma**2)
    with np.errstate(over="ignore"):
        # log((1-q) + q e^u): log1p form near u = 0 (where it is ~q u), logaddexp where e^u is huge.
        log_mix = np.where(u < 30, np.log1p(q * np.expm1(np.minimum(u, 30))),
                           np.logaddexp(math.log1p(-q), math.log(q) + u))
    log_mu0 = -z * z / (2 * sigma**2) - math.log(sigma * math.sqrt(2 * math.pi))
    ax = alpha * log_mix
    with np.errstate(over="ignore"):
        f = np.where(ax < 50, np.exp(log_mu0) * np.expm1(np.minimum(ax, 50)), np.exp(log_mu0 + ax) - np.exp(log_mu0))
    return math.log1p(float(np.sum(f) * h))


def rdp_sampled_gaussian(q: float, sigma: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Renyi DP of one step of the Gaussian mechanism (noise sigma x sensitivity) applied to a
    Poisson sample of rate q, at each order -> `[len(orders)]`; add over steps."""
    if q == 0:
        return np.zeros(len(orders))
    if sigma == 0:
        return np.full(len(orders), np.inf)
    out = []
    for a in orders:
        if q == 1.0:
            out.append(a / (2 * sigma**2))
        elif float(a).is_integer():
            out.append(_log_a_integer(q, sigma, int(a)) / (a - 1))
        else:
            out.append(_log_a_fractional(q, sigma, float(a)) / (a - 1))
    return np.asarray(out)


def epsilon_from_rdp(rdp: np.ndarray, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> tuple[float, float]:
    """Tightest (epsilon, order) for `delta` over the orders, with the conversion of Balle et al.
    2020 (tighter than the classic `rdp + log(1/delta)/(alpha-1)`)."""
    a = np.asarray(orders, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        eps = rdp + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)
    eps = np.where(np.isfinite(eps), eps, np.inf)
    best = int(np.argmin(eps))
    return max(float(eps[best]), 0.0), float(a[best])


class RDPAccountant:
    """Composes steps of (noise multiplier, sampling rate) and reports epsilon for a delta."""

    name = "rdp"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS):
        self.orders = tuple(orders)
        self.history: list[list[float]] = []  # [sigma, q, steps], merged while settings repeat
        self._cache: dict[tuple[float, float], np.ndarray] = {}

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Account for `num_steps` more steps at these settings."""
        if self.history and self.history[-1][:2] == [noise_multiplier, sample_rate]:
            self.history[-1][2] += num_steps
        else:
            self.history.append([noise_multiplier, sample_rate, num_steps])

    def _rdp_per_step(self, sigma: float, q: float) -> np.ndarray:
        if (sigma, q) not in self._cache:
            self._cache[(sigma, q)] = rdp_sampled_gaussian(q, sigma, self.orders)
        return self._cache[(sigma, q)]

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before any step)."""
        if not self.history:
            return 0.0
        rdp = sum(self._rdp_per_step(s, q) * n for s, q, n in self.history)
        return epsilon_from_rdp(rdp, delta, self.orders)[0]


class OpacusAccountant:
    """opacus' accountants (`prv`: privacy loss random variables, tight for many steps) behind
    the same two methods."""

    def __init__(self, name: str = "prv"):
        try:
            from opacus.accountants import create_accountant
        except ImportError as e:
            raise ValueError(f"privacy.accountant={name} needs opacus: pip install -e '.[dp]'") from e
        self.name = name
        self._acc = create_accountant(name)

    def step(self, noise_multiplier: float, sample_rate: float, num_steps: int = 1) -> None:
        """Account for `num_steps` more steps at these settings."""
        for _ in range(num_steps):
            self._acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at `delta` (0 before any step)."""
        return float(self._acc.get_epsilon(delta=delta)) if len(self._acc) else 0.0


def make_accountant(name: str) -> RDPAccountant | OpacusAccountant:
    """`rdp` (built in) or `prv` (opacus)."""
    if name == "rdp":
        return RDPAccountant()
    if name == "prv":
        return OpacusAccountant("prv")
    raise ValueError(f"privacy.accountant={name!r} is not rdp|prv")


def epsilon_after(steps: int, noise_multiplier: float, sample_rate: float, delta: float,
                  accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `steps` steps at fixed settings."""
    acc = make_accountant(accountant)
    if steps > 0:
        acc.step(noise_multiplier, sample_rate, steps)
    return acc.epsilon(delta)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "rdp") -> float:
    """Smallest noise multiplier (to 0.1%) whose `steps` steps stay within `target_epsilon`."""
    lo, hi = 0.0, 1.0
    while epsilon_after(steps, hi, sample_rate, delta, accountant) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ValueError(f"privacy.target_epsilon={target_epsilon} is out of reach for {steps} steps at "
                             f"sampling rate {sample_rate:.3g}; raise it or train fewer steps")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if epsilon_after(steps, mid, sample_rate, delta, accountant) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi


def max_steps_within(target_epsilon: float, delta: float, noise_multiplier: float, sample_rate: float,
                     limit: int, accountant: str = "rdp") -> int:
    """The most steps (<= limit) whose epsilon stays within `target_epsilon` (epsilon grows with steps)."""
    if epsilon_after(limit, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
        return limit
    lo, hi = 0, limit  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_after(mid, noise_multiplier, sample_rate, delta, accountant) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


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
                         expert_mask: torch.Tensor | None = None) -> Iterator[tuple[list[torch.Tensor], float, float]]:
    """Per window of the batch: (its gradient scaled to norm <= max_grad_norm, norm before
    clipping, its loss). Frozen coordinates (masks) are zero and do not count in the norm."""
    masks = list(masks) if masks is not None else [None] * len(params)
    for b in range(batch_BS.shape[0]):
        loss = sample_loss(model, batch_BS[b:b + 1], expert_mask)
        grads = torch.autograd.grad(loss, list(params), allow_unused=True)
        out = []
        for p, g, m in zip(params, grads, masks):
            g = torch.zeros_like(p) if g is None else g.detach()
            out.append(g * m if m is not None else g)
        norm = float(torch.sqrt(sum((g.double().pow(2).sum() for g in out), torch.zeros((), dtype=torch.float64))))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))
        yield [g * scale for g in out], norm, float(loss.detach())


def private_gradient(model, batch_BS: torch.Tensor, params: Sequence[torch.nn.Parameter], *, max_grad_norm: float,
                     noise_multiplier: float, expected_batch_size: float, generator: torch.Generator,
                     masks: Sequence[torch.Tensor | None] | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
    """(sum of clipped per-window gradients + N(0, (sigma C)^2) on trainable coordinates) divided
    by the expected batch size: Poisson batches vary in size, and dividing by the realised size
    would leak it."""
    masks = list(masks) if masks is not None else [None] * len(params)
    total = [torch.zeros_like(p) for p in params]
    norms, losses = [], []
    for grads, norm, loss in clipped_sample_grads(model, batch_BS, params, max_grad_norm, masks):
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
             "clipped_fraction": float(np.mean([n > max_grad_norm for n in norms])) if norms else 0.0}
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
    if not isinstance(src, PrivacyConfig):
        try:
            from omegaconf import OmegaConf

            src = OmegaConf.to_container(src, resolve=True) if OmegaConf.is_config(src) else dict(src)
        except ImportError:
            src = dict(src)
        known = {f.name for f in fields(PrivacyConfig)}
        unknown = sorted(set(src) - known)
        if unknown:
            raise ValueError(f"privacy: unknown settings {unknown}; known: {sorted(known)}")
        src = PrivacyConfig(**src)
    src.validate()
    return src


def _private_windows(cfg):
    from flexmoe.data import TokenWindows

    if getattr(cfg.data, "format", "lm") != "lm":
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
    from flexmoe.convert.safetensors_io import load_model
    from flexmoe.flex.freeze import PLANS, apply_freeze_plan
    from flexmoe.train.metrics import MetricLogger
    from flexmoe.train.optim import build_optimizer, lr_at

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
    owner_stats = nonprivate_owner_statistics(model, PLANS[cfg.stage.freeze].frozen_router_rows)
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
    logger = MetricLogger(out, wandb_cfg=getattr(cfg, "wandb", None))
    print(f"[flexmoe] DP-SGD on {domain}: {num_windows} windows, q={q:.4g}, sigma={sigma:.4g}, "
          f"C={pc.max_grad_norm}, {steps} steps ({cfg.trainer.steps} asked)", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    for step in range(steps):
        lr = lr_at(step, steps, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = lr
        idx = poisson_indices(num_windows, q, rng)
        batch = torch.from_numpy(windows.windows(idx)).to(device)
        grads, stats = private_gradient(model, batch, params, max_grad_norm=pc.max_grad_norm, noise_multiplier=sigma,
                                        expected_batch_size=q * num_windows, generator=gen, masks=masks)
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
          "noise_seed": "fixed (not private)" if pc.noise_seed is not None else "os.urandom"}
    # The expected count, not the realised one: the realised batch sizes are data about the sampling
    # that the released numbers should not carry (metrics.jsonl, which stays with the owner, has them).
    tokens_seen = round(q * num_windows * steps * cfg.data.seq_len)
    val = _val_losses(model, cfg)
    logger.log({"step": steps, "val_loss": val, "dp": dp},
               f"DP-SGD done: epsilon {epsilon:.3f} at delta {pc.delta:g} after {steps} steps")
    logger.close()
    return _write_final(cfg, model, mcfg, base_meta, tokens_seen, val, dp)


@torch.no_grad()
def nonprivate_owner_statistics(model, frozen_router_rows: int) -> list[str]:
    """Tensors of the starting model that the owner filled from its data outside DP-SGD: non-zero
    trainable router rows (the router embedding), owner document centroids and n-gram profiles."""
    found = []
    if frozen_router_rows:
        for i, m in enumerate(model.moe_layers()):
            if bool(m.router.weight[frozen_router_rows:].ne(0).any()):
                found.append(f"layers.{i}.ffn.router.weight rows {frozen_router_rows}+ (router embedding)")
        centroids = getattr(model, "domain_centroids", None)
        if centroids is not None and bool(centroids[frozen_router_rows:].ne(0).any()):
            found.append("domain_centroids (document routing centroid)")
        profiles = getattr(model, "domain_ngrams", None)
        if profiles is not None and bool(profiles[frozen_router_rows:].ne(0).any()):
            found.append("domain_ngrams (document routing n-gram profile)")
    return found


def _val_losses(model, cfg) -> dict[str, float]:
    from flexmoe.data import TokenWindows
    from flexmoe.eval.perplexity import model_logprobs, perplexity

    model.eval()
    n = cfg.trainer.eval_batches * cfg.data.batch_size
    return {d: math.log(perplexity(model_logprobs(model), TokenWindows(p, cfg.data.seq_len), n))
            for d, p in cfg.data.val.items()}


def _write_final(cfg, model, mcfg, base_meta, tokens_seen, val, dp) -> dict[str, Any]:
    from flexmoe.convert.safetensors_io import save_model_dir
    from flexmoe.flex.fingerprint import fingerprint
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

