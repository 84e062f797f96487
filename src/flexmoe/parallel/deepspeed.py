"""DeepSpeed ZeRO 1/2/3 as the alternative engine to FSDP2, around our own MoE layer.

Supported: data parallelism only (tp = ep = 1, no HSDP, no compile); mesh.resolve_dims refuses
the rest before any training starts. The optimizer is ours (AdamW over trainable parameters
only, so frozen parameters get no optimizer state and DeepSpeed reduces no gradient for them);
the learning-rate schedule is set by the trainer each step. Batch sizes, gradient accumulation
and clipping come from our config; a DeepSpeed JSON (`parallel.deepspeed_config`) may add
anything else (bucket sizes, overlap, offload), and may not contradict ours.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn


def deepspeed_config(cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for a RunConfig: its JSON (if any) + what our settings fix."""
    p = cfg.parallel
    base: dict[str, Any] = {}
    src = "the Hydra config"
    if p.deepspeed_config:
        src = f"parallel.deepspeed_config={p.deepspeed_config}"
        try:
            base = json.loads(Path(p.deepspeed_config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{src}: not a readable DeepSpeed JSON ({e})") from e
    for key in ("optimizer", "scheduler"):
        if key in base:
            raise ValueError(f"{src}: remove '{key}': flexmoe builds AdamW from optim.* and sets the schedule itself")
    json_stage = base.get("zero_optimization", {}).get("stage")
    stage = p.zero_stage if p.zero_stage is not None else (json_stage if json_stage is not None else 2)
    if json_stage is not None and json_stage != stage:
        raise ValueError(f"parallel.zero_stage={p.zero_stage} contradicts zero_optimization.stage={json_stage} "
                         f"in {src}; set one of them")
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {stage} from {src} is not 1, 2 or 3")
    ours = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.trainer.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.trainer.grad_accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in ours.items():
        if key in base and base[key] != value:
            raise ValueError(f"{src}: {key}={base[key]} but data.batch_size, trainer.grad_accum and optim.grad_clip "
                             f"give {value}; drop it from the JSON")
    out = {**base, **ours, "zero_optimization": {**base.get("zero_optimization", {}), "stage": stage}}
    if cfg.trainer.dtype == "bf16":
        out.setdefault("bf16", {"enabled": True})
    out.setdefault("zero_allow_untested_optimizer", True)  # our torch AdamW
    out.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs
    return out


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any]):
    """Wrap model and optimizer in a DeepSpeed engine (the process group must already exist)."""
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError("parallel.engine=deepspeed but deepspeed is not installed: "
                         "pip install -e '.[deepspeed]'") from e
    if not torch.cuda.is_available():
        # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks on first use (minutes on a
        # small machine, under a file lock); the gloo group we already made does the job.
        # (importlib: `deepspeed.comm.torch` as an attribute is the torch package itself)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                           dist_init_required=False)
    return engine


def full_state_dict(engine) -> dict[str, torch.Tensor]:
    """Every parameter in full on rank 0 (ZeRO-3 gathers them; a collective), {} elsewhere."""
    import deepspeed
    import torch.distributed as dist

    module = engine.module
    rank = dist.get_rank() if dist.is_initialized() else 0

    def grab() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else {}

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return grab()
    return grab()
