"""Run configuration: typed dataclasses that Hydra validates (types and unknown keys) before any
process starts."""

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List, Optional, TypeVar

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
    # lm: plain next-token windows (`flexmoe prepare-data`). sft: chat data from
    # `flexmoe prepare-data --format sft`; loss on assistant tokens only, attention kept inside
    # each packed example.
    format: str = "lm"


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
    # auto: torch AdamW, fused on CUDA, foreach elsewhere (both take FSDP2/TP DTensors); apex: apex's
    # FusedAdam, only on plain CUDA tensors (its kernels read raw pointers: no DTensors); torch: foreach.
    impl: str = "auto"


# The values of data.format, named here so the CLI can refuse a typo before importing torch.
DATA_FORMATS = ("lm", "sft")

# The freeze plans of flexmoe.train.freeze.PLANS, named here so the CLI can refuse a typo before
# importing torch (tests/test_config.py keeps the two lists equal).
FREEZE_PLAN_NAMES = ("none", "expert_anchor", "router_tune", "midtrain", "sft", "rl_unfrozen")


@dataclass
class StageConfig:
    name: str = "public_pretrain"
    freeze: str = "none"  # a plan in flexmoe.train.freeze.PLANS
    public_mix: float = 0.0  # share of each batch drawn from data.train["public"] (expert stages)


@dataclass
class TrainerConfig:
    steps: int = 100
    grad_accum: int = 1
    seed: int = 0
    # fp32 | bf16 (autocast) | auto: bf16 on GPUs and on CPUs with AMX/AVX512-BF16, fp32 on others (bf16
    # is ~90x slower on AVX2-only CPUs); `flexmoe train` defaults to auto (conf/train.yaml)
    dtype: str = "fp32"
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 8
    save_every: int = 0  # 0: only at the end
    keep_last: int = 2
    # Checkpoints hold trainable tensors only: frozen ones are rebuilt from init_from (checked on
    # resume). True writes them too (a checkpoint that stands without init_from).
    checkpoint_frozen: bool = False
    # Periodic checkpoints written in the background (DCP async_save): the step loop goes on while
    # they are written; one in flight at a time; stop, preemption and the last save are synchronous.
    async_save: bool = False
    resume: bool = True  # continue from the newest complete checkpoint in out_dir
    # A finished run (out_dir/final/ written) is never trained again silently: true replaces final/
    # (a public router row `router-embed --public` attached to it is carried over).
    overwrite_final: bool = False
    stop_after: int = 0  # >0: checkpoint and stop after this many steps of this run (time-sliced jobs)
    preempt_signal: str = "SIGUSR1"  # finish the step, checkpoint, requeue (SLURM --signal); "" disables
    requeue: bool = True  # on preemption, `scontrol requeue $SLURM_JOB_ID` (when inside SLURM)
    # Memory per device the estimate (train/memory.py) must fit in, GiB: -1 the CUDA device's own
    # (no check on CPU), 0 no check. A layout over it is refused before anything is allocated.
    device_memory_gib: float = -1.0
    # final/ as shards of at most this size ('5GB', '500MB', bytes) plus an index, like merge and
    # branch write with --max-shard-size; None: one model.safetensors
    max_shard_size: Optional[str] = None


@dataclass
class WandbConfig:
    enabled: bool = False
    # None: $WANDB_MODE if set (online | offline | disabled), else offline. An explicit
    # wandb.mode=... wins over the environment, as any Hydra override does.
    mode: Optional[str] = None
    project: str = "flexmoe"
    name: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None  # e.g. one group per sweep
    tags: List[str] = field(default_factory=list)


@dataclass
class OwnerConfig:
    owner: str = "public"
    domain: str = "public"
    licence: str = "unspecified"


ACCOUNTANTS = ("rdp", "prv")


CLIPPING = ("auto", "book_keeping", "per_unit_backward")  # privacy.clipping (train/privacy.private_gradient)
PRIVACY_UNITS = ("window", "document", "user")  # privacy.unit (data/units.py)


@dataclass
class PrivacyConfig:
    """`privacy.*` settings of a DP-SGD run (RunConfig gains `privacy: PrivacyConfig`)."""

    enabled: bool = False
    noise_multiplier: float = 1.0  # sigma: noise std / max_grad_norm; 0 with target_epsilon: calibrated
    max_grad_norm: float = 1.0  # per-sample clipping norm C
    delta: float = 1e-5  # must be below 1 / number of training windows
    target_epsilon: float = 0.0  # > 0: stop before the step that would exceed it
    sampling_rate: float = 0.0  # Poisson rate q; 0: data.batch_size / number of windows
    accountant: str = "rdp"  # opacus' rdp (Renyi DP) | prv (privacy loss random variables); extra `dp`
    # None draws the noise and sampling seed from os.urandom. A fixed seed makes runs repeatable
    # but lets anyone who knows it subtract the noise: tests only, never for a released expert.
    noise_seed: Optional[int] = None
    # The owner's router embedding (`flexmoe router-embed`) and document centroid are means over
    # the owner's data computed without noise: a DP expert starts from a zero owner row (branch
    # without --router-embedding). True accepts such a start, and the dp record says so.
    allow_nonprivate_router_init: bool = False
    # How per-unit gradients are clipped: book_keeping (one forward and one backward per batch,
    # train/ghost.py), per_unit_backward (one backward per window: the reference), auto
    # (book-keeping where the model qualifies: only experts and routers train, no auxiliary loss).
    clipping: str = "auto"
    # What one guarantee protects: one training window, or one document (the stretch of the data
    # ending in eos), cut into windows of its own and truncated after max_unit_windows of them, or
    # one user (all their documents, each cut so; max_unit_windows in all; needs data prepared
    # with prepare-data --user-field).
    unit: str = "window"
    max_unit_windows: int = 8

    def validate(self) -> None:
        """Refuse settings that give no guarantee or no training, naming the setting."""
        checks = [
            (self.accountant in ACCOUNTANTS, f"privacy.accountant={self.accountant!r} is not rdp|prv"),
            (self.max_grad_norm > 0, f"privacy.max_grad_norm={self.max_grad_norm} must be > 0"),
            (0 < self.delta < 1, f"privacy.delta={self.delta} must be in (0, 1), e.g. 1e-5"),
            (self.noise_multiplier >= 0, f"privacy.noise_multiplier={self.noise_multiplier} must be >= 0"),
            (self.noise_multiplier > 0 or self.target_epsilon > 0,
             "privacy.noise_multiplier=0 gives no privacy; set it > 0, or set privacy.target_epsilon to calibrate it"),
            (self.target_epsilon >= 0, f"privacy.target_epsilon={self.target_epsilon} must be >= 0 (0: no target)"),
            (0 <= self.sampling_rate <= 1, f"privacy.sampling_rate={self.sampling_rate} must be in [0, 1]"),
            (self.unit in PRIVACY_UNITS, f"privacy.unit={self.unit!r} is not {'|'.join(PRIVACY_UNITS)}"),
            (self.max_unit_windows >= 1, f"privacy.max_unit_windows={self.max_unit_windows} must be >= 1"),
            (self.clipping in CLIPPING, f"privacy.clipping={self.clipping!r} is not {'|'.join(CLIPPING)}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # enabled=true: DP-SGD (train/privacy.py)
    tokenizer: Optional[str] = None  # recorded in the output; `bytes` or a tokenizer directory
    dry_run: bool = False
    extra: List[str] = field(default_factory=list)

    def validate(self) -> None:
        """Every check the config alone allows, in one place; ValueError names the setting."""
        if self.stage.freeze not in FREEZE_PLAN_NAMES:
            raise ValueError(f"stage.freeze={self.stage.freeze!r} is not one of {', '.join(FREEZE_PLAN_NAMES)}")
        if self.data.format not in DATA_FORMATS:
            raise ValueError(f"data.format={self.data.format!r} is not one of {', '.join(DATA_FORMATS)}")
        if self.optim.impl not in ("auto", "torch", "apex"):
            raise ValueError(f"optim.impl={self.optim.impl!r} is not one of auto, torch, apex")
        self._check_ranges()
        if self.privacy.enabled:
            self.privacy.validate()
        # The world size torchrun or SLURM launched (1 for a plain process): the layout is checked
        # against it here, before any process group or model exists.
        if self.init_from is None:  # a model from init_from is checked when its config is read
            self.parallel.check_tp(self.model)
        self.parallel.check_world(int(os.environ.get("WORLD_SIZE", "1") or 1))
        if self.init_from is None:
            self.parallel.check_ep(self.model)

    def _check_ranges(self) -> None:
        """Numbers a run cannot use: `trainer.steps=-5` wrote an untrained final/, a seq_len past
        the model's positions trained silently. The model's own sizes are ModelConfig's to check."""
        t, d, o = self.trainer, self.data, self.optim
        checks = [
            (t.steps >= 1, f"trainer.steps={t.steps} must be >= 1 (optimizer steps to train)"),
            (t.grad_accum >= 1, f"trainer.grad_accum={t.grad_accum} must be >= 1"),
            (t.log_every >= 1, f"trainer.log_every={t.log_every} must be >= 1"),
            (t.eval_every >= 0, f"trainer.eval_every={t.eval_every} must be >= 0 (0: only at the end)"),
            (t.eval_batches >= 1, f"trainer.eval_batches={t.eval_batches} must be >= 1"),
            (t.save_every >= 0, f"trainer.save_every={t.save_every} must be >= 0 (0: only at the end)"),
            (t.keep_last >= 0, f"trainer.keep_last={t.keep_last} must be >= 0 (0: keep every checkpoint)"),
            (t.stop_after >= 0, f"trainer.stop_after={t.stop_after} must be >= 0 (0: run to trainer.steps)"),
            (_size_ok(t.max_shard_size), f"trainer.max_shard_size={t.max_shard_size!r} is not a size such as 5GB, "
                                         "500MB or a byte count > 0"),
            (t.threads >= 0, f"trainer.threads={t.threads} must be >= 0 (0: torch's default)"),
            (t.dtype in ("fp32", "bf16", "auto"), f"trainer.dtype={t.dtype!r} is not fp32|bf16|auto"),
            (d.seq_len >= 1, f"data.seq_len={d.seq_len} must be >= 1"),
            (d.batch_size >= 1, f"data.batch_size={d.batch_size} must be >= 1"),
            (all(math.isfinite(w) and w >= 0 for w in d.weights.values()),
             f"data.weights={dict(d.weights)} must all be finite and >= 0"),
            (all(isinstance(v, str) and v for v in [*d.train.values(), *d.val.values()]),
             "data.train and data.val map each domain to a prepared directory (a non-empty path)"),
            (0 <= self.stage.public_mix <= 1, f"stage.public_mix={self.stage.public_mix} must be in [0, 1]"),
            (math.isfinite(o.lr) and o.lr >= 0, f"optim.lr={o.lr} must be finite and >= 0"),
            (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0"),
            (0 <= o.min_lr_ratio <= 1, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]"),
            (math.isfinite(o.weight_decay) and o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1={o.beta1}, optim.beta2={o.beta2} must be in [0, 1)"),
            (math.isfinite(o.eps) and o.eps > 0, f"optim.eps={o.eps} must be > 0"),
            (math.isfinite(o.grad_clip) and o.grad_clip >= 0, f"optim.grad_clip={o.grad_clip} must be >= 0 (0: off)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)
        if self.init_from is None:  # with init_from, the trainer checks against the loaded model's config
            check_seq_len(d.seq_len, self.model, "model")


def check_seq_len(seq_len: int, model: ModelConfig, where: str) -> None:
    """Refuse data.seq_len above the model's max_seq_len (its positions were never meant to go there)."""
    if seq_len > model.max_seq_len:
        raise ValueError(f"data.seq_len={seq_len} exceeds {where}.max_seq_len={model.max_seq_len}; lower data.seq_len "
                         f"(or raise model.max_seq_len for a model trained from scratch)")


T = TypeVar("T")


def to_typed(cls: type[T], src: Any, where: str) -> T:
    """A `cls` dataclass from a dataclass, a Hydra/OmegaConf node or a dict; unknown keys and
    wrong types are refused naming `where` and the key."""
    if isinstance(src, cls):
        return src
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    data = OmegaConf.to_container(src, resolve=True) if OmegaConf.is_config(src) else dict(src)
    unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"{where}: unknown settings {unknown}; known: {sorted(f.name for f in fields(cls))}")  # type: ignore[arg-type]
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ValueError(f"{where}: {str(e).splitlines()[0]}") from e


def as_run_config(cfg: Any) -> RunConfig:
    """The typed, validated RunConfig of a run, made once at the entry point (`flexmoe train`,
    `train()`); everything below takes it as it is."""
    run = to_typed(RunConfig, cfg, "config")
    run.validate()
    return run


def _size_ok(text) -> bool:
    if text is None:
        return True
    from flexmoe.config.sizes import parse_size

    try:
        return (parse_size(text) or 0) > 0
    except (ValueError, TypeError):
        return False
