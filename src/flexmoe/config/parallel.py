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

    def check_model(self, m) -> None:
        """The tp/ep degrees against the model's shapes (no world size needed); ValueError names both."""
        self.check_tp(m)
        self.check_ep(m)

    def check_tp(self, m) -> None:
        """tp against the heads and d_ff it splits."""
        tp = self.tp
        if tp > 1:
            for name, value in (("num_heads", m.num_heads), ("num_kv_heads", m.kv_heads), ("d_ff", m.d_ff)):
                if value % tp:
                    raise ValueError(f"parallel.tp={tp} does not divide model.{name}={value}")

    def check_ep(self, m) -> None:
        """ep against the experts it splits."""
        ep = self.ep
        if ep > 1:
            if not m.is_moe:
                raise ValueError(f"parallel.ep={ep} needs an MoE model (model.num_experts > 0)")
            if m.num_experts % ep:
                raise ValueError(f"parallel.ep={ep} does not divide model.num_experts={m.num_experts}")

    def check_world(self, world_size: int) -> int:
        """The settings and degrees against the world size; returns dp_shard (-1 resolved).
        ValueError names the setting at fault."""
        _fail(self.engine in ENGINES, f"parallel.engine={self.engine!r} is not one of {'|'.join(ENGINES)}")
        _fail(self.ac in AC_MODES, f"parallel.ac={self.ac!r} is not one of {'|'.join(AC_MODES)}")
        _fail(self.ac_every >= 1, f"parallel.ac_every={self.ac_every} must be >= 1")
        for key in ("param_dtype", "reduce_dtype"):
            value = getattr(self, key)
            _fail(value in DTYPES, f"parallel.{key}={value!r} is not one of {'|'.join(DTYPES)}")
        _fail(self.backend in ("auto", "nccl", "gloo"), f"parallel.backend={self.backend!r} is not auto|nccl|gloo")
        for key in ("dp_replicate", "tp", "ep"):
            _fail(getattr(self, key) >= 1, f"parallel.{key}={getattr(self, key)} must be >= 1")
        _fail(self.dp_shard >= 1 or self.dp_shard == -1,
              f"parallel.dp_shard={self.dp_shard} must be >= 1 or -1 (the rest)")
        fixed = self.dp_replicate * self.tp
        if self.dp_shard == -1:
            _fail(world_size % fixed == 0,
                  f"world size {world_size} is not divisible by parallel.dp_replicate={self.dp_replicate} x "
                  f"parallel.tp={self.tp}; launch a multiple of {fixed} processes")
            dp_shard = world_size // fixed
        else:
            dp_shard = self.dp_shard
            _fail(fixed * dp_shard == world_size,
                  f"parallel.dp_replicate={self.dp_replicate} x dp_shard={dp_shard} x tp={self.tp} = "
                  f"{fixed * dp_shard} but the world size is {world_size}; set parallel.dp_shard=-1 or launch "
                  f"{fixed * dp_shard} processes")
        _fail(dp_shard % self.ep == 0, f"parallel.ep={self.ep} does not divide dp_shard={dp_shard} (expert "
                                       f"parallelism borrows ranks from the sharded data-parallel axis); lower parallel.ep")
        return dp_shard


def _fail(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)
