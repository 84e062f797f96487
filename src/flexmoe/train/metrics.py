"""Throughput, MFU and logging (console, a JSONL file, wandb when enabled)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from flexmoe.io.log import get_logger

log = get_logger(__name__)

# Dense bf16 peak FLOP/s of known accelerators (no sparsity).
GPU_PEAK_FLOPS = {
    "H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12,
    "L40S": 362e12, "A10": 125e12, "V100": 125e12, "B200": 2250e12, "GH200": 989e12,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32) -> float:
    """Peak FLOP/s: a table for GPUs; on CPU a matmul measured once and cached per machine."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_FLOPS.items():
            if key in name:
                return peak
        return 100e12
    cache = Path(os.environ.get("FLEXMOE_CACHE", Path.home() / ".cache" / "flexmoe")) / "cpu_peak.json"
    key = f"v2-{torch.get_num_threads()}-{dtype}-{torch.__version__}"
    try:
        known = json.loads(cache.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key not in known:
        # Large enough to reach the BLAS kernel's steady state; best of several to skip noise.
        n = 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = time.perf_counter()
        a @ b
        best = time.perf_counter() - t
        # a dtype this CPU has no kernel for (bf16 without AVX512-BF16/AMX: ~90x slower) would take
        # minutes at 8 rounds; one (warm-up included) already says how slow it is
        for _ in range(7 if best < 1.0 else 0):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        known[key] = 2 * n**3 / best
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known))
        except OSError:
            pass
    return known[key]


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process so far: allocated CUDA memory, or on CPU the peak resident set
    (which includes the interpreter and libraries, and never goes down)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def wandb_settings(wandb_cfg: Any) -> dict[str, Any]:
    """wandb.init's project/name/entity/group/tags/mode; the mode is the config's, else $WANDB_MODE,
    else offline (no network is assumed)."""
    mode = wandb_cfg.mode or os.environ.get("WANDB_MODE") or "offline"
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"wandb.mode={mode!r} is not online|offline|disabled")
    return {"project": wandb_cfg.project, "name": wandb_cfg.name, "entity": wandb_cfg.entity,
            "group": wandb_cfg.group, "tags": list(wandb_cfg.tags) or None, "mode": mode}


class MetricLogger:
    """Rank 0 prints one line per log step and appends JSON records to `metrics.jsonl`."""

    def __init__(self, out_dir: str | Path, enabled: bool = True, wandb_cfg: Any = None, run_config: Any = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if enabled and wandb_cfg is not None and wandb_cfg.enabled:
            try:
                import wandb  # type: ignore
            except ImportError as e:
                raise ValueError("wandb.enabled=true but wandb is not installed: pip install -e '.[wandb]'") from e
            mode = wandb_settings(wandb_cfg)["mode"]
            if mode != "disabled":
                self.wandb = wandb.init(dir=str(out_dir), config=run_config, **wandb_settings(wandb_cfg))

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            log.info(console, extra={"bare": True})
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record.get("step"))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
