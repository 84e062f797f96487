"""The model a training run starts from, built so that no rank ever holds all of it.

Every fsdp-engine path (one process, FSDP2, TP, EP and their mixes) builds the Transformer on
the meta device, applies the stage's freeze plan, lays it out (parallel/parallelize.py),
allocates this rank's shards only (`to_empty`) and fills them:

- fresh: the per-parameter draws `Transformer.reset_parameters(seed)` makes, in the same order
  from the same generator (so the same values); each rank draws one full tensor at a time and
  keeps its slice of it;
- `init_from`: each local shard's rows read as byte spans of model.safetensors (a frozen expert
  slot lives in `*_frozen` `[n, ...]`, the trainable slots in `[E - n, ...]`, the file holds the
  canonical `[E, ...]`), other dims cut in memory, a 16 MiB block of rows at a time.

Frozen tensors (the anchor slot; attention, embeddings and norms under expert_anchor) and
buffers keep the dtype the file stores them in: a bf16 public model stays bf16, bit for bit, with
no fp32 copy; trainable tensors are fp32 masters. Rank 0 alone checks the file's sha256s against
flexmoe.json, before any rank reads a byte.

DeepSpeed builds the same way. ZeRO 1 and 2 replicate the weights, so every rank fills its own
whole copy (still with no random init thrown away, and frozen tensors in their stored dtype).
ZeRO 3 partitions them: each tensor in turn is allocated whole, filled on rank 0 only (from the
file, or drawn from the seed), then handed to `deepspeed.zero.Init`, which broadcasts it and keeps
this rank's partition; a rank never holds more than one whole tensor beyond its partitions.
FLEXMOE_FULL_BUILD=1 keeps the old path (`build_model`: every rank builds and loads the whole
model in fp32), to compare against.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from flexmoe.config.model import ModelConfig
from flexmoe.config.train import RunConfig
from flexmoe.io.errors import CheckpointError
from flexmoe.io.native import open_native
from flexmoe.io.stream import CHUNK, FilePool, LazyTensor
from flexmoe.model import Transformer
from flexmoe.model.moe import FROZEN_SUFFIX, GroupedExperts
from flexmoe.model.rope import RotaryEmbedding
from flexmoe.parallel.grad import carry_row_masks, row_masks
from flexmoe.parallel.mesh import Meshes, world
from flexmoe.parallel.parallelize import parallelize
from flexmoe.train.freeze import PLANS, apply_freeze_plan, restore_row_masks, trainable_summary
from flexmoe.train.load import load_model

FULL_BUILD_ENV = "FLEXMOE_FULL_BUILD"


@dataclass
class Built:
    model: nn.Module
    mcfg: ModelConfig
    meta: dict[str, Any]  # init_from's flexmoe.json ({} for a fresh model)
    shapes: dict[str, tuple[int, ...]]  # every stored (canonical) tensor's shape
    stored: dict[str, torch.dtype]  # ... and the dtype final/ writes it in: init_from's, else fp32
    source: dict[str, Any]  # where the frozen tensors come from; a resumed run must agree
    trainable: dict[str, int]  # trainable parameters per group, whole tensors


def build_model(cfg: RunConfig) -> tuple[Transformer, ModelConfig, dict[str, Any]]:
    """The whole model on the host in fp32, from `init_from` (a native model dir) or fresh from
    `cfg.model`, with the stage's freeze plan (DeepSpeed's path, and FLEXMOE_FULL_BUILD=1)."""
    if cfg.init_from:
        model, mcfg, meta = load_model(cfg.init_from)
    else:
        mcfg = cfg.model
        torch.manual_seed(cfg.trainer.seed)
        model, meta = Transformer(mcfg), {}
        model.reset_parameters(seed=cfg.trainer.seed)
    _check_plan(cfg)
    apply_freeze_plan(model, PLANS[cfg.stage.freeze])
    return model, mcfg, meta


def _check_plan(cfg: RunConfig) -> None:
    if cfg.stage.freeze not in PLANS:
        raise ValueError(f"stage.freeze={cfg.stage.freeze!r} is not one of {sorted(PLANS)}")


def full_build_requested(cfg: RunConfig) -> bool:
    return os.environ.get(FULL_BUILD_ENV, "") not in ("", "0")


def build_for_training(cfg: RunConfig, meshes: Meshes | None, device: torch.device,
                       ds_config: dict[str, Any] | None = None) -> Built:
    """The model laid out per `cfg.parallel` on `meshes` (None: one process or DeepSpeed), on `device`.
    `ds_config`: the DeepSpeed config of a deepspeed-engine run (ZeRO 3 partitions as it builds)."""
    _check_plan(cfg)
    full = full_build_requested(cfg)
    lazy: dict[str, LazyTensor] | None = None
    if cfg.init_from:
        # the full build verifies on its own (every rank, as it always did)
        mcfg, lazy, meta = open_init_from(cfg.init_from, verify=not full)
        source: dict[str, Any] = {"init_from_files": meta["files"]}
    else:
        mcfg, meta, source = cfg.model, {}, {"seed": cfg.trainer.seed}
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in Transformer(mcfg).state_dict().items()}
    stored = {k: lazy[k].dtype if lazy is not None and k in lazy else torch.float32 for k in shapes}
    if full:
        model, _, _ = build_model(cfg)
        trainable = trainable_summary(model)
        model.to(device)
        parallelize(model, cfg.parallel, meshes)
    elif ds_config is not None and ds_config["zero_optimization"]["stage"] == 3:
        model, trainable = _build_zero3(cfg, mcfg, device, lazy, stored, shapes, ds_config)
    else:
        model, trainable = _build_sharded(cfg, mcfg, meshes, device, lazy, stored, shapes)
    model.train()
    # Activations run in fp32 beside frozen bf16 weights; FSDP's bf16 param_dtype makes all bf16.
    fsdp_bf16 = meshes is not None and meshes.dp.size() > 1 and cfg.parallel.param_dtype == "bf16"
    model.compute_dtype = None if fsdp_bf16 else torch.float32
    return Built(model, mcfg, meta, shapes, stored, source, trainable)


def open_init_from(src, verify: bool = True) -> tuple[ModelConfig, dict[str, LazyTensor], dict[str, Any]]:
    """Config, lazy tensors and meta of `src`; with `verify` rank 0 alone checks the sha256s (and
    expert hashes) against flexmoe.json while the other ranks wait, and every rank raises its error."""
    rank, world_size = world()
    opened, error = None, None
    if rank == 0 or not verify:
        try:
            opened = open_native(src, verify=verify)
        except CheckpointError as e:
            error = e
    if verify and world_size > 1:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)  # also the barrier: nobody reads before rank 0 checked
        if box[0] is not None and error is None:
            error = CheckpointError(box[0])
        if rank != 0 and error is None:
            opened = open_native(src, verify=False)
    if error is not None:
        raise error
    return opened


def tensor_slots(model: nn.Module) -> dict[str, list[tuple[int, nn.Module, str]]]:
    """Stored (canonical) key -> [(first row of it held, module, attribute)], rows in order: frozen
    expert slots `[0, n)` in `*_frozen`, the others in the trainable stack; everything else whole."""
    out: dict[str, list[tuple[int, nn.Module, str]]] = {}
    for prefix, mod in model.named_modules():
        names = [n for n, p in mod._parameters.items() if p is not None]
        names += [n for n, b in mod._buffers.items() if b is not None and n not in mod._non_persistent_buffers_set]
        for name in names:
            key, row0 = name, 0
            if isinstance(mod, GroupedExperts):
                key = name.removesuffix(FROZEN_SUFFIX)
                row0 = 0 if name.endswith(FROZEN_SUFFIX) else mod.num_frozen
            out.setdefault(f"{prefix}.{key}" if prefix else key, []).append((row0, mod, name))
    return {k: sorted(v, key=lambda s: s[0]) for k, v in out.items()}


def _build_sharded(cfg, mcfg, meshes, device, lazy, stored, shapes) -> tuple[nn.Module, dict[str, int]]:
    with torch.device("meta"):
        model = Transformer(mcfg)
    apply_freeze_plan(model, PLANS[cfg.stage.freeze])
    slots = tensor_slots(model)
    if set(slots) != set(shapes):
        raise AssertionError(f"tensors of the model and of its state dict differ: {sorted(set(slots) ^ set(shapes))}")
    _keep_stored_dtypes(slots, stored)
    trainable = trainable_summary(model)
    parallelize(model, cfg.parallel, meshes)
    masks = row_masks(model)
    model.to_empty(device=device)  # this rank's shards only
    # to_empty may hand back new parameter objects: row masks (and, where no FSDP/TP parameter
    # swap hides them, their gradient hooks) go back on
    params = dict(model.named_parameters())
    restore_row_masks(model, {n: k for n, k in masks.items() if not isinstance(params[n], DTensor)})
    carry_row_masks(model, masks)
    _reset_rope(model, mcfg, device)
    slots = tensor_slots(model)
    with torch.no_grad():
        if lazy is None:
            _fill_fresh(model, mcfg, cfg.trainer.seed, slots, shapes)
        else:
            _fill_from_file(slots, lazy)
    return model, trainable


def _build_zero3(cfg, mcfg, device, lazy, stored, shapes, ds_config) -> tuple[nn.Module, dict[str, int]]:
    """ZeRO-3 partitions, one whole tensor at a time: allocated, filled on rank 0 (the only rank
    that reads the file or draws values), then broadcast and cut by `deepspeed.zero.Init`."""
    import deepspeed

    from flexmoe.train.freeze import _mask_rows

    rank = world()[0]
    with torch.device("meta"):
        model = Transformer(mcfg)
    apply_freeze_plan(model, PLANS[cfg.stage.freeze])
    slots = tensor_slots(model)
    _keep_stored_dtypes(slots, stored)
    trainable = trainable_summary(model)
    parallelize(model, cfg.parallel, None)  # activation checkpointing only
    masks = row_masks(model)
    names = {(id(mod), attr): f"{prefix}.{attr}" if prefix else attr
             for prefix, mod in model.named_modules() for attr in mod._parameters}
    # zero.Init(module=...) would otherwise replace torch.nn.functional.linear for the whole process
    # (and its config reader counts ranks before deepspeed.comm exists: the global batch is left out)
    init_cfg = {**{k: v for k, v in ds_config.items() if k != "train_batch_size"},
                "zero_optimization": {**ds_config["zero_optimization"], "memory_efficient_linear": False}}
    with torch.device("meta"):
        order = [n for n, _ in Transformer(mcfg).named_parameters()]
    gen = torch.Generator().manual_seed(cfg.trainer.seed) if lazy is None and rank == 0 else None
    done: set[str] = set()
    with torch.no_grad(), FilePool() as pool:
        # parameters in the fresh draws' order (the order reset_parameters(seed) draws them in), then
        # buffers: each rank keeps its own whole copy (ZeRO partitions parameters only)
        for key in order + [k for k in slots if k not in order]:
            src = lazy.get(key) if lazy is not None else None
            value = None
            if gen is not None and key in order:
                value = Transformer.init_value(key, shapes[key], mcfg.init_std, gen)
            for row0, mod, attr in slots[key]:
                old = getattr(mod, attr)
                t = torch.empty(old.shape, dtype=old.dtype, device=device)
                is_param = attr in mod._parameters
                fill = rank == 0 or not is_param
                if fill and src is not None:
                    _fill(t, row0, src.shape, lambda a, b, src=src: pool.read(src.rows(a, b)))
                elif fill and value is not None:
                    _fill(t, row0, shapes[key], lambda a, b, v=value: v[a:b])
                elif fill:
                    t.zero_()  # buffers of a fresh model, and routing buffers a native file may lack
                if not is_param:
                    mod._buffers[attr] = t
                    continue
                p = nn.Parameter(t, requires_grad=old.requires_grad)
                mod._parameters[attr] = p
                name = names[(id(mod), attr)]
                if name in masks:
                    _mask_rows(p, masks[name])
                holder = nn.Module()
                holder.register_parameter("p", p)
                deepspeed.zero.Init(module=holder, config_dict_or_path=init_cfg)  # broadcast, keep this rank's part
                done.add(name)
            del value
    _reset_rope(model, mcfg, device)
    missing = [n for n, _ in model.named_parameters() if n not in done]
    if missing:
        raise AssertionError(f"parameters left unpartitioned: {missing[:4]}")
    return model, trainable


def _reset_rope(model: nn.Module, mcfg: ModelConfig, device: torch.device) -> None:
    """RoPE's inverse frequencies: a non-persistent buffer (never in a file), recomputed as __init__ does."""
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = RotaryEmbedding(mcfg.dim_head, mcfg.rope_theta).inv_freq.to(device)
            m._cache = None


def _keep_stored_dtypes(slots, stored) -> None:
    """Frozen parameters and buffers (still on meta) take their stored dtype."""
    for key, entries in slots.items():
        for _, mod, name in entries:
            t = getattr(mod, name)
            if t.dtype == stored[key] or (isinstance(t, nn.Parameter) and t.requires_grad):
                continue
            new = torch.empty(t.shape, dtype=stored[key], device="meta")
            if isinstance(t, nn.Parameter):
                mod._parameters[name] = nn.Parameter(new, requires_grad=False)
            else:
                mod._buffers[name] = new


def _fill_fresh(model, mcfg: ModelConfig, seed: int, slots, shapes) -> None:
    # The draws reset_parameters(seed) makes: every parameter of the unfrozen model, in its order.
    with torch.device("meta"):
        order = [n for n, _ in Transformer(mcfg).named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    for key in order:
        value = Transformer.init_value(key, shapes[key], mcfg.init_std, gen)
        for row0, mod, name in slots[key]:
            _fill(getattr(mod, name), row0, shapes[key], lambda a, b, v=value: v[a:b])
        del value
    for key in set(slots) - set(order):  # buffers: zeros, as Transformer.__init__ makes them
        for _, mod, name in slots[key]:
            getattr(mod, name).zero_()


def _fill_from_file(slots, lazy: dict[str, LazyTensor]) -> None:
    with FilePool() as pool:
        for key, entries in slots.items():
            src = lazy.get(key)
            for row0, mod, name in entries:
                t = getattr(mod, name)
                if src is None:  # routing buffers a native file may lack (model_dir.NATIVE_ONLY): zeros
                    t.zero_()
                else:
                    _fill(t, row0, src.shape, lambda a, b, src=src: pool.read(src.rows(a, b)))


def _fill(t: torch.Tensor, row0: int, full_shape, rows: Callable[[int, int], torch.Tensor]) -> None:
    """Copy this rank's part of `t` (rows from `row0` of a stored tensor of `full_shape`) from
    `rows(a, b)` (the stored tensor's rows [a, b), whole), a block of rows at a time."""
    local = t.to_local() if isinstance(t, DTensor) else t
    if local.numel() == 0:
        return
    if isinstance(t, DTensor):
        shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        if tuple(shape) != tuple(local.shape):
            raise AssertionError(f"local shard {tuple(local.shape)} != its computed shape {tuple(shape)}")
    else:
        offset = (0,) * t.dim()
    row_bytes = max(math.prod(full_shape[1:]) * 4, 1)
    step = max(CHUNK // row_bytes, 1)
    start = row0 + offset[0]
    for a in range(0, local.shape[0], step):
        b = min(a + step, local.shape[0])
        block = rows(start + a, start + b)
        for d in range(1, t.dim()):
            block = block.narrow(d, offset[d], local.shape[d])
        local[a:b].copy_(block)
