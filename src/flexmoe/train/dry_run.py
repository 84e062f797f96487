"""`flexmoe train --dry-run`: sizes, FLOPs and memory of a run without allocating the model.

The model is built on the meta device (shapes only), the stage's freeze plan is applied to it,
and parameters are counted; FLOPs come from model/flops.py; memory per device from the parallel
layout's sharding degrees.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from flexmoe.config.model import ModelConfig
from flexmoe.train.freeze import PLANS, apply_freeze_plan
from flexmoe.model import Transformer
from flexmoe.model.flops import flops_per_token, param_counts


def _degree(cfg: Any, name: str) -> int:
    par = cfg.get("parallel") if hasattr(cfg, "get") else getattr(cfg, "parallel", None)
    value = int((par.get(name) if hasattr(par, "get") else getattr(par, name, 1)) or 1) if par is not None else 1
    if value < 1:  # -1: "what the world size leaves"; a dry run takes $WORLD_SIZE as the world
        world = int(os.environ.get("WORLD_SIZE", "1"))
        others = _degree(cfg, "dp_replicate") * _degree(cfg, "tp") if name == "dp_shard" else 1
        value = max(world // max(others, 1), 1)
    return value


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
    shard = _degree(cfg, "dp_shard") * _degree(cfg, "tp")
    ep = _degree(cfg, "ep")
    act_bytes = 2 if cfg.trainer.dtype == "bf16" else 4
    expert_params = mcfg.num_layers * mcfg.num_experts * 3 * mcfg.d_model * mcfg.d_ff if mcfg.is_moe else 0
    # weights: experts split over ep x shard, the rest over shard; grads + AdamW (2 fp32 moments)
    # only for trainable weights; activations: ~34 values per token per layer per d_model (no AC).
    weights = ((pc.total - expert_params) / shard + expert_params / max(shard * ep, 1)) * 4
    opt = trainable / max(shard, 1) * 4 * 3
    tokens = cfg.data.batch_size * cfg.data.seq_len
    acts = tokens * mcfg.num_layers * mcfg.d_model * 34 * act_bytes / max(_degree(cfg, "tp"), 1)
    logits = tokens * mcfg.vocab_size * 4 * 2 / max(_degree(cfg, "tp"), 1)
    return {
        "params_total": pc.total, "params_active": pc.active, "params_trainable": trainable,
        "trainable_by_group": groups, "flops_per_token": fpt,
        "memory_per_device_gib": {"weights": weights / 2**30, "grads_and_optimizer": opt / 2**30,
                                  "activations": (acts + logits) / 2**30,
                                  "total": (weights + opt + acts + logits) / 2**30},
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
    ])
