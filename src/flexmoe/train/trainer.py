"""The training loop shared by every stage: public pretraining, expert training, router tuning."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from flexmoe.config.model import ModelConfig
from flexmoe.config.train import RunConfig, as_run_config
from flexmoe.io.model_dir import CONFIG, META
from flexmoe.model import Transformer
from flexmoe.train.build import build_for_training, build_model  # noqa: F401  (build_model re-exported)
from flexmoe.train.final import write_final
from flexmoe.parallel import deepspeed as ds
from flexmoe.parallel.grad import clip_grad_norm_, mask_frozen_rows
from flexmoe.parallel.mesh import build_mesh, init_distributed, local_device, resolve_dims, world
from flexmoe.parallel.parallelize import fit_optimizer
from flexmoe.train import checkpoint as ckpt
from flexmoe.train.preempt import Preemption
from flexmoe.train.provenance import write_run_info
from flexmoe.train.metrics import MetricLogger, device_peak_flops, peak_memory_gib
from flexmoe.train.dry_run import dry_run
from flexmoe.train.memory import GIB, MemoryEstimate, check_fits
from flexmoe.train.optim import build_optimizer, lr_at
from flexmoe.train.sources import build_train_source, data_format, open_windows  # noqa: F401  (re-exported)
from flexmoe.io.log import get_logger
from flexmoe.io.progress import format_seconds
from flexmoe.io.writer import kill_point
from flexmoe.train.hardware import resolve_dtype

log = get_logger(__name__)


@torch.no_grad()
def evaluate_loss(model: Transformer, windows, num_batches: int, batch_size: int,
                  expert_mask: torch.Tensor | None = None, device: torch.device | None = None) -> float:
    """Mean next-token loss over the first `num_batches * batch_size` windows (deterministic).

    For SFT windows (dicts with a loss mask) it is the mean over trained (assistant) targets of
    all those windows, with attention kept inside each packed example, as in training.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    n = min(len(windows), num_batches * batch_size)
    total, count = 0.0, 0
    if n and isinstance(windows[0], dict):
        for start in range(0, n, batch_size):
            items = [windows[i] for i in range(start, min(start + batch_size, n))]
            tokens, mask, docs = (torch.from_numpy(np.stack([it[k] for it in items])).to(device)
                                  for k in ("tokens", "loss_mask", "doc_ids"))
            # the loss inside the model: the head runs chunked, no [B, S, vocab] logits
            loss = model(tokens[:, :-1], expert_mask, doc_ids=docs, targets=tokens[:, 1:], loss_mask=mask,
                         loss_reduction="sum").loss
            total, count = total + loss.item(), count + mask.float().sum().item()
        model.train(was_training)
        return total / max(count, 1)
    for start in range(0, n, batch_size):
        batch = torch.from_numpy(np.stack([windows[i] for i in range(start, min(start + batch_size, n))])).to(device)
        loss = model(batch[:, :-1], expert_mask, targets=batch[:, 1:], loss_reduction="sum").loss
        total, count = total + loss.item(), count + batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def training_loss(forward, inputs: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor | None = None,
                  doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, loss + router aux loss) of one micro-batch, as the training loop computes them.

    Without `loss_mask`: mean cross-entropy over every target (data.format=lm). With it
    (data.format=sft): the mean over trained targets only, so a masked target gets exactly zero
    gradient, and `doc_ids` keeps attention inside each packed example. Each micro-batch is the
    mean over its own trained targets; the training loop reweighs SFT micro-batches by their
    share of the global batch's trained targets.
    """
    # The model takes the loss itself: its head then runs chunked (model/loss.py), never
    # holding [B, S, vocab] logits; FSDP and DeepSpeed wrappers pass the keywords through.
    if loss_mask is None:
        o = forward(inputs, targets=targets)
    else:
        o = forward(inputs, doc_ids=doc_ids, targets=targets, loss_mask=loss_mask)
    loss = o.loss
    return loss, (loss + o.aux_loss if o.aux_loss is not None else loss)


def describe(cfg: RunConfig, mcfg: ModelConfig, device: torch.device | None = None) -> dict[str, Any]:
    """Parameter counts, FLOPs per token and the memory estimate (the dry run's, train/memory.py);
    refuses a layout whose estimate exceeds `trainer.device_memory_gib` (-1: the CUDA device's)."""
    info = dry_run(cfg, mcfg)
    budget = cfg.trainer.device_memory_gib
    if budget < 0:
        budget = (torch.cuda.get_device_properties(device).total_memory / GIB
                  if device is not None and device.type == "cuda" else 0.0)
    est = info["memory_per_device_gib"]
    check_fits(MemoryEstimate(**{k: v * GIB for k, v in est.items() if k != "total"}), budget,
               f"{cfg.parallel.engine} with data.batch_size={cfg.data.batch_size}, parallel.ac={cfg.parallel.ac}")
    return info


def check_run_inputs(cfg: RunConfig) -> None:
    """What the config alone cannot tell: data.seq_len against an init_from model's max_seq_len, and
    every data directory against the model (one tokenizer, every token id inside its vocabulary;
    the data manifests are schema-checked on the way). Raises ValueError naming the setting."""
    from flexmoe.config.train import check_seq_len
    from flexmoe.data.fit import check_data_fits_model
    from flexmoe.io.model_dir import read_model_meta

    mcfg, tokenizer, model = cfg.model, cfg.tokenizer, "model"
    if cfg.init_from:
        if not Path(cfg.init_from).is_dir():
            raise ValueError(f"init_from={cfg.init_from}: not a directory; give a flexmoe model directory")
        mcfg = ModelConfig.load(Path(cfg.init_from) / CONFIG)
        tokenizer = read_model_meta(cfg.init_from).get("tokenizer") or cfg.tokenizer
        model = f"init_from={cfg.init_from}"
        check_seq_len(cfg.data.seq_len, mcfg, "init_from's model")
    for split, domains in (("train", cfg.data.train), ("val", cfg.data.val)):
        for name, path in domains.items():
            windows = open_windows(cfg, split, name, path)
            check_data_fits_model(windows, mcfg.vocab_size, tokenizer, setting=f"data.{split}.{name}", model=model)
            if tokenizer is None:  # one run, one tokenizer: the first directory's holds for the rest
                tokenizer, model = windows.manifest["tokenizer"], f"{model} (with the tokenizer of data.{split}.{name})"


def check_not_finished(cfg: RunConfig) -> None:
    """Refuse to train into an out_dir whose run finished (final/ written) unless trainer.overwrite_final."""
    final = Path(cfg.out_dir) / "final"
    if (final / META).is_file() and not cfg.trainer.overwrite_final:
        raise ValueError(f"out_dir={cfg.out_dir}: holds a finished run ({final}); choose a new out_dir, or "
                         "trainer.overwrite_final=true to train it again and replace final/")


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run one training stage to `trainer.steps`, resuming from `out_dir` when it holds a checkpoint.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: it joins the process group, lays the
    model out per `cfg.parallel` (FSDP2/TP/EP or DeepSpeed) and reads its slice of each global
    batch of `data.batch_size` x data-parallel size; rank 0 alone logs and writes `final/`.
    With `privacy.enabled=true` each step is a DP-SGD step (train/private_step.py) in the same
    loop: checkpoints, resume, preemption, metrics and final/ as for any run, plus a `dp` record.
    """
    cfg = as_run_config(cfg)  # a Hydra node from a caller becomes the typed config here, once
    cfg = resolve_dtype(cfg, local_device())  # trainer.dtype=auto: by this machine's bf16 speed
    if cfg.privacy.enabled:
        from flexmoe.train.private_step import check_private_run

        check_private_run(cfg)  # before anything is built or written
    if cfg.trainer.threads > 0:
        torch.set_num_threads(cfg.trainer.threads)
    resolve_dims(cfg.parallel, int(os.environ.get("WORLD_SIZE", "1")))  # bad layouts fail before anything loads
    created = init_distributed(cfg.parallel)
    try:
        return _train(cfg)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: RunConfig) -> dict[str, Any]:
    from flexmoe.data import BatchLoader

    rank, world_size = world()
    sft = data_format(cfg) == "sft"  # before the model loads: a typo costs nothing
    out = Path(cfg.out_dir)
    device = local_device()
    # Sizes and the memory check come from the config alone: an over-budget layout is refused
    # before anything is allocated.
    info = describe(cfg, ModelConfig.load(Path(cfg.init_from) / CONFIG) if cfg.init_from
                    else cfg.model, device)
    if cfg.dry_run:
        return info
    check_run_inputs(cfg)  # the data against the model, before anything is written
    check_not_finished(cfg)
    out.mkdir(parents=True, exist_ok=True)
    dims = resolve_dims(cfg.parallel, world_size, ModelConfig.load(Path(cfg.init_from) / CONFIG)
                        if cfg.init_from else cfg.model)
    use_ds = cfg.parallel.engine == "deepspeed"
    meshes = None if use_ds else build_mesh(dims, device.type)
    # meta-device build, layout, then each rank fills its own shards only (train/build.py)
    ds_config = ds.deepspeed_config(cfg, world_size) if use_ds else None
    built = build_for_training(cfg, meshes, device, ds_config)
    model, trainable_groups = built.model, built.trainable
    optimizer = build_optimizer(model, cfg.optim)
    fit_optimizer(optimizer)
    engine = None
    if use_ds:
        engine = ds.initialize(model, optimizer, ds_config)
        optimizer = engine.optimizer
    dp_rank, dp_size = (meshes.dp_rank, meshes.dp_size) if meshes is not None else (rank, world_size)
    private, loader = None, None
    if cfg.privacy.enabled:  # DP-SGD: its own Poisson sampler over the owner's windows
        from flexmoe.train.private_step import PrivateStep

        private = PrivateStep(cfg, model, built.meta, device)
    else:
        loader = BatchLoader(build_train_source(cfg), cfg.data.batch_size, seed=cfg.trainer.seed, rank=dp_rank,
                             world_size=dp_size)
    steps = private.steps if private is not None else cfg.trainer.steps  # DP may stop at its target epsilon
    val = {d: open_windows(cfg, "val", d, p) for d, p in cfg.data.val.items()}
    logger = MetricLogger(out, enabled=rank == 0, wandb_cfg=cfg.wandb, run_config=dataclasses.asdict(cfg))
    if rank == 0:
        write_run_info(out, cfg)
    # Which groups this stage trains, so a wrong freeze plan shows in the log before any step.
    logger.log({"step": 0, "freeze_plan": cfg.stage.freeze, "trainable_params": trainable_groups},
               f"stage {cfg.stage.name}, freeze plan {cfg.stage.freeze}: trainable parameters "
               + ", ".join(f"{g} {n:,}" for g, n in trainable_groups.items()))

    start, tokens_seen = 0, 0
    ckpt_root = out / "checkpoints"
    done = ckpt.complete_checkpoints(ckpt_root)
    if cfg.trainer.resume and done:
        state = ckpt.load_checkpoint(done[-1], model, optimizer, engine=engine, frozen_from=built.source,
                                     config=dataclasses.asdict(cfg))
        start, tokens_seen = state["step"], state["tokens_seen"]
        if private is not None:
            private.load_state_dict(state["private"], start)
        else:
            loader.load_state_dict(state["loader"])
        if rank == 0:
            log.info(f"resumed from {done[-1]} at step {start}")

    # bf16 compute over fp32 masters (and frozen tensors as stored) on both engines: DeepSpeed's
    # own bf16 mode is left off (parallel/deepspeed.py says why)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.trainer.dtype == "bf16"
                else contextlib.nullcontext())
    peak = device_peak_flops(device, torch.bfloat16 if cfg.trainer.dtype == "bf16" else torch.float32)
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = (private.tokens_per_step if private is not None
                       else cfg.data.batch_size * cfg.data.seq_len * cfg.trainer.grad_accum * dp_size)
    forward = engine if engine is not None else model
    t_last, steps_since, losses = time.perf_counter(), 0, []
    t_start = t_last
    history: list[dict[str, Any]] = []
    preemption = Preemption(out, cfg.trainer.preempt_signal, cfg.trainer.requeue)

    def trainer_state() -> dict[str, Any]:  # what a checkpoint carries besides the tensors
        sampler = {"private": private.state_dict()} if private is not None else {"loader": loader.state_dict()}
        return {"tokens_seen": tokens_seen, "config": dataclasses.asdict(cfg), "frozen_from": built.source, **sampler}

    for step in range(start, steps):
        lr = lr_at(step, steps, cfg.optim)
        for g in optimizer.param_groups:
            g["lr"] = lr
        dp_stats: dict[str, float] = {}
        if private is not None:  # clipped, noised gradients in .grad; no other clipping
            dp_stats = private.step()
            step_loss = dp_stats.pop("loss")
            if not math.isfinite(step_loss) and dp_stats["batch_size"] > 0:
                raise FloatingPointError(f"loss became {step_loss} at step {step}; lower optim.lr or check the data")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            step_loss, gnorm = _ordinary_step(step, cfg, forward, loader, model, optimizer, engine, trainable, autocast,
                                              sft, world_size, dp_size, device)
        tokens_seen += tokens_per_step
        losses.append(step_loss)
        steps_since += 1
        s = step + 1
        kill_point(f"train-step-{s}")  # test hook (FLEXMOE_TEST_KILL_AT): SIGKILL after this step
        if s % cfg.trainer.log_every == 0 or s == steps:
            dt = time.perf_counter() - t_last
            tps = steps_since * tokens_per_step / dt
            per_device = tps / world_size
            mfu = per_device * info["flops_per_token"] / peak
            rec = {"step": s, "loss": sum(losses) / len(losses), "lr": lr, "tokens_per_s": tps,
                   "tokens_per_s_per_device": per_device, "mfu": mfu, "peak_mem_gib": peak_memory_gib(device),
                   "grad_norm": float(gnorm) if private is None and gnorm is not None else None,
                   "tokens_seen": tokens_seen, **dp_stats}
            # ETA from this run's own steps so far (a resumed run does not count the steps it skipped)
            elapsed = time.perf_counter() - t_start
            rec["eta_s"] = elapsed / (s - start) * (steps - s)
            dp_text = (f"  eps {dp_stats['epsilon']:.3f} (delta {dp_stats['delta']:g})  batch "
                       f"{int(dp_stats['batch_size'])}  clipped {dp_stats['clipped_fraction']:.0%}" if dp_stats else "")
            logger.log(rec, f"step {s:>6}/{steps}  loss {rec['loss']:.4f}  lr {lr:.2e}  "
                            f"tok/s/dev {per_device:,.0f}  mfu {mfu:.1%}  mem {rec['peak_mem_gib']:.2f}GiB  "
                            f"elapsed {format_seconds(elapsed)}  eta {format_seconds(rec['eta_s'])}{dp_text}")
            t_last, steps_since, losses = time.perf_counter(), 0, []
        module = engine.module if engine is not None else model
        if cfg.trainer.eval_every and s % cfg.trainer.eval_every == 0 and s < steps and val:
            history.append(_validate(module, val, cfg, s, logger))
        stopping = cfg.trainer.stop_after > 0 and s - start >= cfg.trainer.stop_after and s < steps
        preempted = s < steps and preemption.requested()
        stopping = stopping or preempted
        ckpt.poll_pending()  # a background checkpoint that every rank has written now counts
        if (cfg.trainer.save_every and s % cfg.trainer.save_every == 0 and s < steps) or stopping:
            ckpt.save_checkpoint(ckpt_root, s, model, optimizer, trainer_state(), keep_last=cfg.trainer.keep_last,
                                 engine=engine, keep_frozen=cfg.trainer.checkpoint_frozen,
                                 async_save=cfg.trainer.async_save and not stopping and engine is None)
        if stopping:
            status = preemption.finish() if preempted else "stopped"
            logger.close()
            return {"stopped_at": s, "status": status, "checkpoint": str(ckpt.complete_checkpoints(ckpt_root)[-1])}
    module = engine.module if engine is not None else model
    final_val = _validate(module, val, cfg, steps, logger) if val else {}
    ckpt.save_checkpoint(ckpt_root, steps, model, optimizer, trainer_state(), keep_last=cfg.trainer.keep_last,
                         engine=engine, keep_frozen=cfg.trainer.checkpoint_frozen)
    extra = None
    if private is not None:
        extra = {"dp": private.record(steps)}
        logger.log({"step": steps, **extra}, f"DP-SGD done: epsilon {extra['dp']['epsilon']:.3f} at delta "
                                             f"{extra['dp']['delta']:g} after {steps} steps")
    # one tensor at a time, never the whole model on one rank; every rank returns what rank 0 wrote
    result = write_final(cfg, built, engine, tokens_seen, final_val, extra_meta=extra)
    logger.close()
    return result


def _ordinary_step(step: int, cfg, forward, loader, model, optimizer, engine, trainable, autocast, sft: bool,
                   world_size: int, dp_size: int, device) -> tuple[float, Any]:
    """One optimizer step over trainer.grad_accum micro-batches; returns (the step's loss, grad norm).
    A non-finite loss raises FloatingPointError."""
    step_loss = 0.0
    ga = cfg.trainer.grad_accum
    micro = [next(loader) for _ in range(ga)]
    # Each micro-batch's share of the step's loss. SFT micro-batches hold different numbers of
    # trained targets, so each is weighed by its count over the global batch's: accumulation
    # and data parallelism then give the loss of one big batch. The mean over all ranks counts
    # each data-parallel group's data once per replica (tp, cp), hence the * dp_size.
    weights = [1.0 / ga] * ga
    if sft:
        counts = [float(b["loss_mask"].sum()) for b in micro]
        global_count = max(_mean_over_ranks(sum(counts), world_size, device) * dp_size, 1.0)
        weights = [c * dp_size / global_count for c in counts]
    for mb, w in zip(micro, weights):
        if sft:
            b = {k: v.to(device) for k, v in mb.items()}
            inputs, targets, mask, docs = b["tokens"][:, :-1], b["tokens"][:, 1:], b["loss_mask"], b["doc_ids"]
        else:
            batch = mb.to(device)
            inputs, targets, mask, docs = batch[:, :-1], batch[:, 1:], None, None
        with autocast:
            loss, total = training_loss(forward, inputs, targets, mask, docs)
        if sft:  # backward divides by ga below (DeepSpeed's engine does it itself)
            total = loss * (w * ga) + (total - loss)
        if engine is not None:
            engine.backward(total)  # scales by 1/grad_accum itself
            engine.step()  # steps the optimizer only at the accumulation boundary
        else:
            (total / ga).backward()
        step_loss += loss.item() * w if sft else loss.item() / ga
    step_loss = _mean_over_ranks(step_loss, world_size, device)
    if not math.isfinite(step_loss):
        raise FloatingPointError(f"loss became {step_loss} at step {step}; lower optim.lr or check the data")
    if engine is not None:
        gnorm = engine.get_global_grad_norm()
    else:
        if world_size > 1:
            mask_frozen_rows(model)
        gnorm = clip_grad_norm_(trainable, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step_loss, gnorm


def _mean_over_ranks(value: float, world_size: int, device: torch.device) -> float:
    """The global batch's loss: tp replicas hold equal values, so the mean over all ranks is the
    mean over data-parallel ranks (each with the same number of tokens)."""
    if world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces device tensors only
    dist.all_reduce(t)
    return float(t) / world_size


def _validate(model, val, cfg, step, logger) -> dict[str, float]:
    losses = {d: evaluate_loss(model, w, cfg.trainer.eval_batches, cfg.data.batch_size) for d, w in val.items()}
    logger.log({"step": step, "val_loss": losses},
               f"step {step:>6} val " + "  ".join(f"{d} {v:.4f}" for d, v in losses.items()))
    return losses
