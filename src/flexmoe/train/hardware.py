"""What this machine can do fast: CPU model and bf16 capability, accelerators, optional kernels.

bf16 matmuls are 2-4x faster than fp32 on CPUs with AMX, and about 90x slower on AVX2-only CPUs
(both measured on our machines), so the CPU dtype is chosen from the CPU's flags, never assumed.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from functools import lru_cache

import torch

BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_name() -> str:
    """The CPU's model name (`/proc/cpuinfo`), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with AMX-BF16 or AVX512-BF16, where bf16 autocast speeds training up."""
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS) or torch.backends.cpu.get_cpu_capability() == "AMX"


def preferred_dtype(device: torch.device) -> str:
    """`bf16` on CUDA devices that support it and on CPUs with fast bf16, else `fp32`."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


def describe_machine() -> dict[str, object]:
    """One dict of what a benchmark or an environment check prints about this machine."""
    info: dict[str, object] = {
        "cpu": cpu_name(), "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_fast_bf16": cpu_has_fast_bf16(), "torch": torch.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "preferred_dtype_cpu": preferred_dtype(torch.device("cpu")),
    }
    for name in ("flash_attn", "apex", "deepspeed", "opacus", "transformers", "wandb", "hydra_plugins.hydra_submitit_launcher"):
        try:
            info[f"has_{name.split('.')[-1]}"] = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            info[f"has_{name.split('.')[-1]}"] = False
    return info


AUTO_DTYPE_ENV = "FLEXMOE_AUTO_DTYPE"  # what trainer.dtype=auto means here, when set (fp32|bf16)


def resolve_dtype(cfg, device: torch.device):
    """`cfg` with trainer.dtype=auto replaced by what this machine runs fastest: bf16 on CUDA with
    bf16 and on CPUs with fast bf16, else fp32 (DP training: always fp32); ${FLEXMOE_AUTO_DTYPE}
    overrides the choice. Other values are returned unchanged."""
    import dataclasses

    if cfg.trainer.dtype != "auto":
        return cfg
    forced = os.environ.get(AUTO_DTYPE_ENV, "")
    if forced and forced not in ("fp32", "bf16"):
        raise ValueError(f"{AUTO_DTYPE_ENV}={forced!r}: set it to fp32 or bf16 (or unset it)")
    chosen = "fp32" if cfg.privacy.enabled else forced or preferred_dtype(device)
    why = ("DP training runs in fp32" if cfg.privacy.enabled else f"{AUTO_DTYPE_ENV}={forced}" if forced
           else f"{device.type}: {'fast' if chosen == 'bf16' else 'no fast'} bf16"
           + (f" ({cpu_name()})" if device.type == "cpu" else ""))
    from flexmoe.io.log import get_logger

    get_logger(__name__).info(f"trainer.dtype=auto -> {chosen} ({why})")
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, dtype=chosen))
