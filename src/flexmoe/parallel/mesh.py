"""Parallel degrees -> a validated layout -> one DeviceMesh with named axes.

Mesh axes, outermost first: `dp_replicate` (HSDP replicas), `dp_shard` (FSDP), `tp`. Expert
parallelism borrows ranks from dp_shard, as in torchtitan: a second view of the same devices
splits dp_shard into `edp` x `ep`, so ep does not multiply the world size. Expert weights are
sharded over `ep` and FSDP-sharded over `edp` (the expert-data-parallel ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from flexmoe.config.model import ModelConfig
from flexmoe.config.parallel import ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    ep: int
    world_size: int

    @property
    def dp(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Expert data parallel: the dp_shard ranks that hold the same experts."""
        return self.dp_shard // self.ep


def _fail(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def resolve_dims(cfg: ParallelConfig, world_size: int, model: ModelConfig | None = None) -> ParallelDims:
    """Check `cfg` against the world size and the model; refuse impossible layouts naming the setting."""
    dp_shard = cfg.check_world(world_size)
    dims = ParallelDims(cfg.dp_replicate, dp_shard, cfg.tp, cfg.ep, world_size)
    if cfg.engine == "deepspeed":
        _fail(cfg.tp == 1 and cfg.ep == 1 and cfg.dp_replicate == 1,
              f"parallel.engine=deepspeed supports data parallelism only (ZeRO 1/2/3); got tp={cfg.tp}, "
              f"ep={cfg.ep}, dp_replicate={cfg.dp_replicate}: use parallel.engine=fsdp for tp/ep/HSDP")
        _fail(not cfg.compile, "parallel.compile=true is not supported with parallel.engine=deepspeed; use engine=fsdp")
        _fail(cfg.zero_stage in (None, 1, 2, 3), f"parallel.zero_stage={cfg.zero_stage} is not 1, 2 or 3")
    if model is not None:
        _check_model(cfg, dims, model)
    return dims


def _check_model(cfg: ParallelConfig, dims: ParallelDims, m: ModelConfig) -> None:
    cfg.check_model(m)
    tp, ep = dims.tp, dims.ep
    if ep > 1:
        # FSDP shards expert weights on dim 1 over the expert-data-parallel ranks (dim 0 is ep's).
        _fail(m.d_ff % (tp * dims.edp) == 0 and m.d_model % dims.edp == 0,
              f"model.d_ff={m.d_ff} (over tp={tp}) and model.d_model={m.d_model} must divide by the "
              f"{dims.edp} expert-data-parallel ranks (dp_shard / ep)")


def world() -> tuple[int, int]:
    """(rank, world size), (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def local_device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(cfg: ParallelConfig) -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1). True when this call created it,
    so the caller knows to destroy it; an existing group (tests, notebooks) is used as is."""
    if dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        if cfg.engine != "deepspeed":
            return False
        # DeepSpeed needs a process group even for one process (ZeRO-offload on one device).
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = cfg.backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    dist.init_process_group(backend, timeout=timedelta(seconds=cfg.timeout_s))
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Meshes:
    """The sub-meshes each parallel step uses; None where that parallelism is off."""

    dp: DeviceMesh | None  # FSDP of dense weights: (dp_shard,) or (dp_replicate, dp_shard)
    tp: DeviceMesh | None
    experts: DeviceMesh | None  # ExpertParallel: (ep,), (tp,) or (ep, tp)
    expert_dp: DeviceMesh | None  # FSDP of expert weights under EP: (edp,) or (dp_replicate, edp)
    dp_rank: int = 0
    dp_size: int = 1


def build_mesh(dims: ParallelDims, device_type: str) -> Meshes | None:
    """The world mesh and its sub-meshes (None for one process)."""
    if dims.world_size == 1:
        return None
    root = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard, dims.tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    # EP's ranks come out of dp_shard: a view of the same devices with dp_shard split in two.
    view = root._unflatten("dp_shard", (dims.edp, dims.ep), ("edp", "ep"))
    hsdp = dims.dp_replicate > 1
    expert_axes = tuple(a for a, n in (("ep", dims.ep), ("tp", dims.tp)) if n > 1)
    dp_rank = root.get_local_rank("dp_replicate") * dims.dp_shard + root.get_local_rank("dp_shard")
    return Meshes(
        dp=root["dp_replicate", "dp_shard"] if hsdp else root["dp_shard"],
        tp=root["tp"] if dims.tp > 1 else None,
        experts=view[expert_axes] if expert_axes else None,
        expert_dp=(view["dp_replicate", "edp"] if hsdp else view["edp"]) if dims.ep > 1 else None,
        dp_rank=dp_rank, dp_size=dims.dp,
    )
