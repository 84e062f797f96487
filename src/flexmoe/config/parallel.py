"""How one training run is laid out over processes: data, tensor and expert parallel degrees,
the engine (torch FSDP2 or DeepSpeed ZeRO), activation checkpointing and compilation."""

from dataclasses import dataclass
from typing import Optional

ENGINES = ("fsdp", "deepspeed")
AC_MODES = ("none", "full", "selective")
DTYPES = ("fp32", "bf16")


@dataclass
class ParallelConfig:
    """Degrees multiply to the world size: `dp_replicate * dp_shard * tp`. Expert parallelism
    borrows ranks from `dp_shard` (as torchtitan does), so `ep` must divide `dp_shard` and does
    not multiply the world size."""

    engine: str = "fsdp"  # fsdp: torch FSDP2 + DTensor TP + our EP | deepspeed: ZeRO 1/2/3
    dp_replicate: int = 1  # HSDP replicas (fsdp engine)
    dp_shard: int = -1  # -1: whatever the world size leaves after dp_replicate and tp
    tp: int = 1
    ep: int = 1
    # FSDP2 mixed precision: dtype parameters are all-gathered and computed in, and gradients reduced in.
    param_dtype: str = "fp32"
    reduce_dtype: str = "fp32"
    ac: str = "none"  # activation checkpointing: none | full (every block) | selective (every ac_every-th block)
    ac_every: int = 2
    compile: bool = False  # torch.compile each block
    compile_backend: str = "inductor"
    zero_stage: Optional[int] = None  # deepspeed: 1 | 2 | 3; None takes deepspeed_config's, else 2
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON; batch sizes and clipping come from our config
    backend: str = "auto"  # process-group backend: auto (nccl on CUDA, else gloo) | nccl | gloo
    timeout_s: int = 600  # collective timeout: a dead peer fails the run instead of hanging it
