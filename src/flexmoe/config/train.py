"""Run configuration: typed dataclasses that Hydra validates (types and unknown keys) before any
process starts."""

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from flexmoe.config.model import ModelConfig
from flexmoe.config.parallel import ParallelConfig


@dataclass
class DataConfig:
    train: Dict[str, str] = field(default_factory=dict)  # domain -> directory from `flexmoe prepare-data`
    weights: Dict[str, float] = field(default_factory=dict)  # domain -> mixture weight (default 1)
    val: Dict[str, str] = field(default_factory=dict)  # domain name -> prepared directory
    seq_len: int = 256
    batch_size: int = 16  # sequences per micro-batch per rank
    verify: bool = True  # check every shard's sha256 against its manifest on load


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0


# The freeze plans of flexmoe.flex.freeze.PLANS, named here so the CLI can refuse a typo before
# importing torch (tests/test_config.py keeps the two lists equal).
FREEZE_PLAN_NAMES = ("none", "expert_anchor", "router_tune", "midtrain", "sft", "rl_unfrozen")


@dataclass
class StageConfig:
    name: str = "public_pretrain"
    freeze: str = "none"  # a plan in flexmoe.flex.freeze.PLANS
    public_mix: float = 0.0  # share of each batch drawn from data.train["public"] (expert stages)


@dataclass
class TrainerConfig:
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    stop_after: int = 0  # >0: checkpoint and stop after this many steps of this run (time-sliced jobs)
    preempt_signal: str = "SIGUSR1"  # finish the step, checkpoint, requeue (SLURM --signal); "" disables
    requeue: bool = True  # on preemption, `scontrol requeue $SLURM_JOB_ID` (when inside SLURM)


@dataclass
class WandbConfig:
    enabled: bool = False
    mode: str = "offline"
    project: str = "flexmoe"
    name: Optional[str] = None


@dataclass
class OwnerConfig:
    owner: str = "public"
    domain: str = "public"
    licence: str = "unspecified"


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    init_from: Optional[str] = None  # a native model directory; None: random init from `model`
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    meta: OwnerConfig = field(default_factory=OwnerConfig)
    tokenizer: Optional[str] = None  # recorded in the output; `bytes` or a tokenizer directory
    dry_run: bool = False
    extra: List[str] = field(default_factory=list)
