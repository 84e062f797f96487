"""`flexmoe train --dry-run`: sizes, FLOPs and memory of a run without allocating the model.

The model is built on the meta device (shapes only), the stage's freeze plan is applied to it,
and parameters are counted; FLOPs come from model/flops.py; memory per device from
train/memory.py, the estimate the trainer also checks before it allocates anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexmoe.config.model import ModelConfig
from flexmoe.io.errors import CheckpointError
from flexmoe.io.shards import read_weights
from flexmoe.model import Transformer
from flexmoe.model.flops import flops_per_token, param_counts
from flexmoe.train.freeze import PLANS, apply_freeze_plan
from flexmoe.train.memory import GIB, estimate_memory


def frozen_dtype_of(cfg: Any) -> tuple[str, str]:
    """(dtype frozen tensors are stored in, where that came from): the init_from file's header,
    else `trainer.dtype` (what the published checkpoints a bf16 recipe branches from hold)."""
    if cfg.init_from:
        try:  # one model.safetensors or shards with an index
            tensors = read_weights(Path(cfg.init_from))
        except CheckpointError:
            tensors = {}
        if tensors:
            first = tensors[sorted(tensors)[0]]
            return ("bf16" if first.dtype == torch.bfloat16 else "fp32"), str(first.path)
    dtype = cfg.trainer.dtype if cfg.trainer.dtype in ("fp32", "bf16") else "fp32"
    return dtype, "trainer.dtype (no init_from weights to read)"


def dry_run(cfg: Any, mcfg: ModelConfig) -> dict[str, Any]:
    """Parameter counts (total, active, trainable), FLOPs per token and memory per device (GiB)."""
    if cfg.stage.freeze not in PLANS:
        raise ValueError(f"stage.freeze={cfg.stage.freeze!r} is not one of {sorted(PLANS)}")
    with torch.device("meta"):
        model = Transformer(mcfg)
    plan = PLANS[cfg.stage.freeze]
    groups = apply_freeze_plan(model, plan)
    pc = param_counts(mcfg)
    trainable = groups["total"]
    frac = None
    if mcfg.is_moe and plan.frozen:
        frac = max(mcfg.num_experts - plan.frozen_experts, 0) / mcfg.num_experts
    fpt = flops_per_token(mcfg, cfg.data.seq_len, training=True, trainable_expert_fraction=frac,
                          shared_trainable=not plan.frozen)
    frozen_dtype, frozen_from = frozen_dtype_of(cfg)
    est = estimate_memory(mcfg, trainable=trainable, frozen_dtype=frozen_dtype,
                          act_dtype="bf16" if cfg.trainer.dtype == "bf16" else "fp32", parallel=cfg.parallel,
                          batch_size=cfg.data.batch_size, seq_len=cfg.data.seq_len,
                          shared_trainable=not plan.frozen, frozen_experts=plan.frozen_experts if mcfg.is_moe else 0)
    return {
        "params_total": pc.total, "params_active": pc.active, "params_trainable": trainable,
        "trainable_by_group": groups, "flops_per_token": fpt,
        "frozen_dtype": frozen_dtype, "frozen_dtype_from": frozen_from,
        "memory_per_device_gib": est.gib(), "memory_estimate_gib": est.total / GIB,
    }


def format_dry_run(info: dict[str, Any]) -> str:
    """Human-readable lines for the console."""
    b = lambda n: f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"  # noqa: E731
    mem = info["memory_per_device_gib"]
    return "\n".join([
        f"parameters: total {b(info['params_total'])}, active {b(info['params_active'])}, "
        f"trainable {b(info['params_trainable'])}",
        f"FLOPs per token (train): {info['flops_per_token'] / 1e9:.2f} GFLOP",
        "memory per device (estimate, GiB): " + ", ".join(f"{k} {v:.2f}" for k, v in mem.items()),
        f"frozen tensors stored as {info['frozen_dtype']} (from {info['frozen_dtype_from']})",
    ])
