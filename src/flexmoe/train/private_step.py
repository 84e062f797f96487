"""DP-SGD as a step strategy of the ordinary trainer (`privacy.enabled=true`).

The trainer (train/trainer.py) builds the model, the optimizer, the checkpoints, the metrics and
final/ as for any run; `PrivateStep` replaces only what one step computes: it draws a Poisson
sample of the owner's training windows, clips each window's gradient and adds noise
(`privacy.private_gradient`: book-keeping clipping where the model qualifies), puts the result in
the trainable parameters' `.grad`, and accounts for the step. Its state (the sampler's and the
noise generator's, the steps accounted) rides in every checkpoint, so a resumed run draws the
same batches and the same noise as one that never stopped, and reports the same epsilon.

The privacy unit (`privacy.unit`, data/units.py) is one training window (`data.seq_len + 1`
tokens; a document spanning k windows is then protected with group privacy, roughly k times
epsilon) or one document: each document is cut into windows of its own, its windows' gradients
are summed before clipping, and documents, not windows, are Poisson-sampled. `privacy.unit=user`
does the same with all of one user's documents as the unit (data prepared with prepare-data
--user-field).
"""

from __future__ import annotations

import base64
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flexmoe.io.log import get_logger
from flexmoe.train.dp_accounting import calibrate_noise, make_accountant, max_steps_within
from flexmoe.train.privacy import nonprivate_owner_statistics, poisson_indices, private_gradient, privacy_config_of, \
    trainable_masks

log = get_logger(__name__)


def check_private_run(cfg) -> None:
    """What DP-SGD cannot do, refused before anything is built, in one line naming the setting."""
    from flexmoe.train.freeze import PLANS

    privacy_config_of(cfg)  # validates privacy.* and needs opacus
    par = cfg.parallel
    if par.ac != "none" or par.compile:
        raise ValueError(f"parallel.ac={par.ac} compile={par.compile} with privacy.enabled=true: DP clipping reads "
                         "each layer's activations once; set parallel.ac=none parallel.compile=false")
    if par.param_dtype != "fp32" or par.reduce_dtype != "fp32":
        raise ValueError("parallel.param_dtype/reduce_dtype with privacy.enabled=true: DP training runs in fp32; set "
                         "both to fp32")
    if cfg.parallel.engine != "fsdp":
        raise ValueError(f"parallel.engine={cfg.parallel.engine} with privacy.enabled=true: DeepSpeed reduces "
                         "gradients inside its own backward, before per-unit clipping can see them; set "
                         "parallel.engine=fsdp (FSDP2, HSDP, tp and ep all run DP-SGD)")
    if cfg.trainer.dtype != "fp32":
        raise ValueError(f"trainer.dtype={cfg.trainer.dtype}: DP training runs in fp32; set trainer.dtype=fp32")
    if cfg.trainer.grad_accum != 1:
        raise ValueError(f"trainer.grad_accum={cfg.trainer.grad_accum} with privacy.enabled=true: a DP step is one "
                         "Poisson batch; set trainer.grad_accum=1 and size it with data.batch_size")
    if not cfg.init_from:
        raise ValueError("privacy.enabled=true needs init_from=<the owner's branched model directory>")
    if cfg.stage.freeze not in PLANS:
        raise ValueError(f"stage.freeze={cfg.stage.freeze!r} is not one of {sorted(PLANS)}")
    if cfg.data.format != "lm":
        raise ValueError(f"data.format={cfg.data.format} with privacy.enabled=true: DP-SGD trains on token windows "
                         "(data.format=lm) only")
    if len(cfg.data.train) != 1:
        raise ValueError(f"data.train names {sorted(cfg.data.train)}; DP training takes exactly one domain, "
                         "the owner's")
    if cfg.stage.public_mix > 0:
        raise ValueError("stage.public_mix > 0 with privacy.enabled=true: DP training samples only the owner's data; "
                         "set stage.public_mix=0")
    if cfg.privacy.unit == "user":  # the manifest alone tells; read it now rather than after the model is built
        from flexmoe.data.errors import DataError
        from flexmoe.data.manifest import read_manifest_record
        from flexmoe.data.units import no_user_ids

        (path,) = cfg.data.train.values()
        if "users" not in read_manifest_record(path):
            raise DataError(no_user_ids(path))


class PrivateStep:
    """One DP-SGD step at a time over the owner's windows; `steps` may be fewer than
    trainer.steps when privacy.target_epsilon is reached first."""

    def __init__(self, cfg, model, base_meta: dict[str, Any], device: torch.device):
        from flexmoe.data.units import open_units
        from flexmoe.train.freeze import PLANS

        self.cfg, self.model, self.device = cfg, model, device
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # the trainer's mesh (dp_shard, tp), row-major: the tp ranks of a data-parallel group read the same units
        self.tp = cfg.parallel.tp
        self.dp_rank, self.dp_size = self.rank // self.tp, self.world // self.tp
        pc = self.pc = privacy_config_of(cfg)
        (self.domain, path), = cfg.data.train.items()
        self.units = open_units(pc.unit, path, cfg.data.seq_len, verify=cfg.data.verify,
                                max_windows=pc.max_unit_windows, pad_id=getattr(model.cfg, "pad_token_id", None),
                                eos_id=getattr(model.cfg, "eos_token_id", None))
        n = self.num_units = len(self.units)
        # data.batch_size counts units: windows, or documents (users) under privacy.unit=document (user)
        self.q = pc.sampling_rate or min(1.0, cfg.data.batch_size / n)
        if pc.delta >= 1 / n:
            raise ValueError(f"privacy.delta={pc.delta:g} must be below 1/{n} (one over the number of "
                             f"training {pc.unit}s); lower it")
        if self.units.tokens_dropped:
            log.warning(f"privacy.unit={pc.unit}: {self.units.tokens_dropped:,} of "
                        f"{self.units.tokens_dropped + self.units.tokens_kept:,} tokens lie past "
                        f"privacy.max_unit_windows={pc.max_unit_windows} windows of their {pc.unit} and are not trained on")
        self.sigma = pc.noise_multiplier or calibrate_noise(pc.target_epsilon, pc.delta, self.q, cfg.trainer.steps,
                                                            pc.accountant)
        self.steps = cfg.trainer.steps
        if pc.target_epsilon > 0:
            self.steps = max_steps_within(pc.target_epsilon, pc.delta, self.sigma, self.q, self.steps, pc.accountant)
            if self.steps == 0:
                raise ValueError(f"privacy.target_epsilon={pc.target_epsilon} is spent before the first step at "
                                 f"noise_multiplier={self.sigma:.3g}; raise the noise or the target")
        dp_profile = bool((base_meta.get("router_embedding") or {}).get("profile_dp"))  # router-embed --dp-epsilon
        self.owner_stats = nonprivate_owner_statistics(model, PLANS[cfg.stage.freeze].frozen_router_rows, dp_profile)
        if self.owner_stats and not pc.allow_nonprivate_router_init:
            raise ValueError(f"{cfg.init_from}: {self.owner_stats[0]} holds statistics of the owner's data computed "
                             "without noise; branch without --router-embedding for a DP expert, or set "
                             "privacy.allow_nonprivate_router_init=true")
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.masks = trainable_masks(self.params)
        seed = pc.noise_seed if pc.noise_seed is not None else int.from_bytes(os.urandom(8), "little")
        if self.world > 1:  # one secret seed for all ranks: they draw the same sample and noise
            box = [seed]
            dist.broadcast_object_list(box, src=0)
            seed = box[0]
        self.rng = np.random.default_rng([seed, 1])
        self.gen = torch.Generator().manual_seed(int(np.random.default_rng([seed, 2]).integers(2**62)))
        self.accountant = make_accountant(pc.accountant)
        self.clipping: str | None = None
        log.info(f"DP-SGD on {self.domain}: {n} {pc.unit}s, q={self.q:.4g}, sigma={self.sigma:.4g}, "
                 f"C={pc.max_grad_norm}, {self.steps} steps ({cfg.trainer.steps} asked)")

    @property
    def tokens_per_step(self) -> int:
        """The expected count, not the realised one: realised batch sizes describe the sampling,
        which released numbers should not carry (metrics.jsonl, which stays with the owner, has them)."""
        return round(self.q * self.units.tokens_kept)

    def step(self) -> dict[str, float]:
        """Sample, clip, noise; leaves the gradient in each trainable parameter's `.grad`."""
        # The global sample, drawn alike on every rank; each data-parallel rank takes every
        # dp_size-th unit, whole (its tp ranks the same ones).
        idx = poisson_indices(self.num_units, self.q, self.rng)[self.dp_rank::self.dp_size]
        tokens, mask, unit = self.units.batch(idx)
        batch = torch.from_numpy(tokens).to(self.device)
        grads, stats = private_gradient(self.model, batch, self.params, max_grad_norm=self.pc.max_grad_norm,
                                        noise_multiplier=self.sigma, expected_batch_size=self.q * self.num_units,
                                        generator=self.gen, masks=self.masks, clipping=self.pc.clipping,
                                        unit_of_window=torch.from_numpy(unit), tp=self.tp,
                                        loss_mask=torch.from_numpy(mask).to(self.device) if mask is not None else None)
        for p, g in zip(self.params, grads):
            p.grad = g
        if self.clipping is None:
            self.clipping = stats["clipping"]
            log.info(f"per-window clipping: {self.clipping}")
        self.accountant.step(self.sigma, self.q)
        eps = self.accountant.epsilon(self.pc.delta)
        return {"epsilon": eps, "delta": self.pc.delta, "batch_size": stats["batch_size"],
                "clipped_fraction": stats["clipped_fraction"], "grad_norm_median": stats["grad_norm_median"],
                "loss": stats["loss"]}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able: the sampler's and the noise generator's state (the checkpoint stays with the
        owner; it lets a resumed run draw exactly what an unbroken one would)."""
        return {"rng": self.rng.bit_generator.state, "noise": base64.b64encode(self.gen.get_state().numpy().tobytes())
                .decode(), "sigma": self.sigma, "q": self.q, "clipping": self.clipping}

    def load_state_dict(self, state: dict[str, Any], steps_done: int) -> None:
        """Restore the generators and account for the `steps_done` steps already taken."""
        if state.get("sigma") != self.sigma or state.get("q") != self.q:
            raise ValueError(f"the checkpoint's DP settings (sigma {state.get('sigma')}, q {state.get('q')}) differ "
                             f"from this run's (sigma {self.sigma}, q {self.q}); resume with the same privacy.* and data")
        self.rng.bit_generator.state = state["rng"]
        self.gen.set_state(torch.frombuffer(bytearray(base64.b64decode(state["noise"])), dtype=torch.uint8))
        self.clipping = state.get("clipping")
        self.accountant.step(self.sigma, self.q, steps_done)

    def record(self, steps_done: int) -> dict[str, Any]:
        """The `dp` record of final/flexmoe.json, which `flexmoe package` copies into the manifest."""
        pc, cfg = self.pc, self.cfg
        return {"epsilon": self.accountant.epsilon(pc.delta), "delta": pc.delta, "noise_multiplier": self.sigma,
                "max_grad_norm": pc.max_grad_norm, "sampling_rate": self.q, "sampling": "poisson",
                "steps": steps_done, "steps_asked": cfg.trainer.steps, "target_epsilon": pc.target_epsilon or None,
                "accountant": self.accountant.name, "unit": self.units.describe(), "num_units": self.num_units,
                "expected_batch_size": self.q * self.num_units, "tokens_not_trained": self.units.tokens_dropped,
                "excludes": [f"{name} (computed from the owner's data without noise)" for name in self.owner_stats],
                "noise_seed": "fixed (not private)" if pc.noise_seed is not None else "os.urandom",
                "clipping": self.clipping}
