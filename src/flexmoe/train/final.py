"""final/: the trained model as a native directory, never gathered whole on one rank.

Every rank takes part in each tensor's gather (DTensor.full_tensor(), one tensor at a time, in
the fingerprint's order); rank 0 appends it to model.safetensors, whose header it wrote first
from the known shapes and stored dtypes, and frees it, hashing the file and the fingerprint on
the way (io/streamed.py). Each tensor is written in the dtype init_from stores it in: frozen
tensors are bit-identical, and a trainable slot from a bf16 file is written as bf16 (so a
canonical `[E, ...]` expert tensor has one dtype and the fingerprint sees the stored bytes).
Under DeepSpeed the same pass runs over the engine's module: ZeRO-3 gathers one parameter at a
time (deepspeed.zero.GatheredParameters), ZeRO 1/2 hold them whole already.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from flexmoe.io.streamed import Made, fingerprint_order, write_streamed_model_dir
from flexmoe.parallel import deepspeed as ds
from flexmoe.parallel.mesh import world
from flexmoe.train.build import Built, tensor_slots


def final_meta(cfg, built: Built, tokens_seen: int, val_loss: dict[str, float], fp: str) -> dict[str, Any]:
    """flexmoe.json's fields of a trained model whose fingerprint is `fp`."""
    mcfg, base_meta = built.mcfg, built.meta
    base_fp = base_meta.get("base_fingerprint") or base_meta.get("fingerprint")
    meta = {
        "kind": "public" if not mcfg.is_moe else base_meta.get("kind", "moe"),
        "stage": cfg.stage.name, "owner": cfg.meta.owner, "domain": cfg.meta.domain, "licence": cfg.meta.licence,
        "tokens_seen": tokens_seen + int(base_meta.get("tokens_seen", 0)) if not mcfg.is_moe else tokens_seen,
        "tokenizer": base_meta.get("tokenizer") or cfg.tokenizer, "val_loss": val_loss,
        "experts": base_meta.get("experts"), "router_embedding": base_meta.get("router_embedding"),
    }
    if mcfg.is_moe and base_fp:
        meta["base_fingerprint"] = base_fp
        # The anchor recipe promises the shared tensors never moved: check, don't assume.
        meta["shared_unchanged"] = fp == base_fp
    else:
        meta["fingerprint"] = fp
    return meta


def write_final(cfg, built: Built, engine, tokens_seen: int, val_loss: dict[str, float],
                extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `out_dir/final` (a collective: every rank calls it); every rank returns what rank 0 wrote.
    `extra_meta` (e.g. a DP run's `dp` record) joins flexmoe.json's fields."""
    rank, world_size = world()
    if engine is not None:
        make = functools.partial(_ds_gathered, tensor_slots(engine.module))
    else:
        for m in built.model.modules():
            if isinstance(m, FSDPModule):  # an eval forward leaves reshard_after_forward=False units gathered
                m.reshard()
        make = functools.partial(_gathered, tensor_slots(built.model))
    order, _ = fingerprint_order(built.shapes)
    result: dict[str, Any] = {}
    if rank == 0:
        sources = {k: Made(built.stored[k], built.shapes[k], functools.partial(make, k, built.stored[k], True))
                   for k in order}
        written: dict[str, Any] = {}

        def make_meta(fp: str) -> dict[str, Any]:
            written.update(final_meta(cfg, built, tokens_seen, val_loss, fp), **(extra_meta or {}))
            return written

        from flexmoe.config.sizes import parse_size

        final, _ = write_streamed_model_dir(Path(cfg.out_dir) / "final", built.mcfg, sources, make_meta,
                                            max_shard_size=parse_size(cfg.trainer.max_shard_size))
        result = {"final": str(final), "val_loss": val_loss, "tokens_seen": tokens_seen, **written}
    else:
        for k in order:  # the same gathers, in the same order, for rank 0's writer
            for _ in make(k, built.stored[k], False):
                pass
    if world_size > 1:
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _gathered(slots, key: str, dtype: torch.dtype, keep: bool) -> Iterator[torch.Tensor]:
    """The stored tensor `key` in pieces along dim 0 (frozen slots, then trainable ones), each
    gathered whole on every rank (DTensor) and yielded, in `dtype` on the host, where `keep`."""
    for _, mod, name in slots[key]:
        t = getattr(mod, name).detach()
        full = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            yield full.to("cpu", dtype).contiguous()
        del full


def _ds_gathered(slots, key: str, dtype: torch.dtype, keep: bool) -> Iterator[torch.Tensor]:
    """`_gathered` for a DeepSpeed engine's module (ZeRO-3 parameters are gathered one at a time)."""
    for _, mod, name in slots[key]:
        full = ds.whole(getattr(mod, name), keep)
        if keep:
            yield full.to("cpu", dtype).contiguous()
        del full
