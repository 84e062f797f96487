"""Native model directories as lazy tensors: opened with every check, written streaming.

The same layout as `model_dir.save_model_dir` (config.json, weights with experts stacked `[E, ...]`
as one model.safetensors or as shards with an index, flexmoe.json with every file's sha256), for
models too large to hold in memory. `write_native` is the one writer of native weights: branch,
merge, remove-expert, import-hf and `save_model_dir` (the trainer's final save) all go through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from flexmoe.config.model import ModelConfig
from flexmoe.config.sizes import parse_size  # noqa: F401  (re-exported: writers' --max-shard-size)
from flexmoe.io.keys import NATIVE_ONLY, is_per_expert_key, native_shapes, storage_order
from flexmoe.io.hf_dir import hf_architecture
from flexmoe.io.model_dir import (CONFIG, META, CheckpointError, carry_tokenizer, check_weight_listing, read_model_meta, refuse_temp_dir,
                                  verify_files, write_json)
from flexmoe.io.dtypes import text
from flexmoe.io.files import sha256_file
from flexmoe.io.fingerprint import bound, compose, expert_record_keys, parts_leaves, slot_line, verify_expert_hashes
from flexmoe.io.schema import MODEL_FORMAT
from flexmoe.io.shards import read_weights
from flexmoe.io.stream import FilePool, LazyTensor
from flexmoe.io.writer import ExpertHashTap, PartsTap, Source, Tap, write_tensors


def open_native(src: str | Path, verify: bool = True, defer: FilePool | None = None
                ) -> tuple[ModelConfig, dict[str, LazyTensor], dict[str, Any]]:
    """Config, lazy tensors and meta of a native directory (one file or sharded); flexmoe.json's
    schema, the weight files it lists, the index, key set and shapes checked, and with `verify` the
    file sha256s and every expert's tensor_sha256 (read streaming).

    With `defer` (the pool the caller's pass reads through), the weight files' sha256s are checked
    by that pass instead (`FilePool.check_expected`) and expert hashes are left to the caller."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a flexmoe model directory)")
    if not (src / CONFIG).is_file() and (src / "manifest.json").is_file():
        raise CheckpointError(f"{src}: is an expert package, not a model; merge it with the public model first")
    arch = hf_architecture(src)
    if arch is not None:
        raise CheckpointError(f"{src / CONFIG}: is a Hugging Face config ({arch}), not a flexmoe one; "
                              "`flexmoe import-hf` turns the directory into a native model")
    refuse_temp_dir(src)
    meta = read_model_meta(src)
    if verify:
        verify_files(src, meta, defer=defer)
    names = check_weight_listing(src, meta)
    try:
        cfg = ModelConfig.load(src / CONFIG)
    except ValueError as e:
        raise CheckpointError(str(e).splitlines()[0]) from e
    try:
        tensors = read_weights(src)
    except CheckpointError as e:
        raise defer.blame(e) if defer is not None else e
    where = src / names[0]
    want = native_shapes(cfg)
    missing = sorted(set(want) - set(tensors) - set(NATIVE_ONLY))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unexpected tensor {extra[0]}"
        raise CheckpointError(f"{where}: {what} for the model {src / CONFIG} describes")
    for k, shape in want.items():
        if k in tensors and tensors[k].shape != shape:
            raise CheckpointError(f"{tensors[k].path}: {k} has shape {list(tensors[k].shape)}, {src / CONFIG} implies "
                                  f"{list(shape)}")
    if verify and defer is None and cfg.is_moe:
        with FilePool() as pool:
            # Slots whose bytes are a part just verified take that part's digest (format 2 records).
            verify_expert_hashes(tensors, meta, cfg.num_layers, src, chunks=pool.chunks,
                                 leaves=parts_leaves(meta["files"], tensors))
    return cfg, tensors, meta


def expert_tap(cfg: ModelConfig, labels: list[list[int]] | None = None) -> ExpertHashTap:
    """A tap computing every slot's tensor_sha256 as the weights are written (labels: see ExpertHashTap)."""
    return ExpertHashTap(expert_record_keys(cfg.num_layers), labels or [[j] for j in range(cfg.num_experts)])


def write_native(tmp: Path, cfg: ModelConfig, tensors: dict[str, Source], meta: dict[str, Any], pool: FilePool,
                 progress=None, hashed: tuple[str, ...] = (), *, max_shard_size: int | str | None = None,
                 bind_experts: bool = False, taps: tuple[Tap, ...] = (),
                 finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 order: list[str] | None = None) -> dict[str, Any]:
    """Write a native directory's files into `tmp` (the caller's `atomic_dir`); returns the meta written.

    `tensors`: lazy tensors (byte spans of input files), tensors in memory, or io.writer's Stacked /
    Generated, in any mix; written in `keys.storage_order` (or `order`), as one model.safetensors or as shards
    of at most `max_shard_size` (bytes or '5GB') with model.safetensors.index.json. Every file's
    entry is taken from the bytes as they are written: its parts (io.digests), a per-expert tensor
    slot by slot, each part's sha256 hashed or, for bytes copied from a part of an input verified
    before the pass (`pool.known`), taken from that input's record. With `bind_experts`, meta's
    `experts` records get each slot's tensor_sha256 (format 2) composed from those parts. Input files registered with
    `pool.expect` are verified after the pass, then `finish(meta)` runs (a caller's checks of what
    its taps saw; it may raise, and returns the meta to write). meta gains the sha256s of the
    weights, the config and the files named in `hashed` (already in `tmp`)."""
    order = storage_order(tensors, cfg.is_moe) if order is None else order
    # Weight files are recorded by parts (io.digests), per-expert tensors slot by slot: bytes copied
    # from a verified part of an input take its digest, and the experts' records compose from them.
    parts = PartsTap([k for k in order if is_per_expert_key(k)], pool.known)
    for tap in taps:
        if isinstance(tap, ExpertHashTap):
            tap.parts_tap = parts  # its format-2 records compose from these per-slot digests
    try:
        files = write_tensors(tmp, {k: tensors[k] for k in order}, pool, max_shard_size=parse_size(max_shard_size),
                              taps=(*taps, parts), progress=progress)
        pool.check_expected()
    except CheckpointError as e:  # a corrupted input explains whatever went wrong while it was read
        err = pool.blame(e)
        if err is e:
            raise
        raise err from e
    if bind_experts:
        records = expert_record_keys(cfg.num_layers)
        meta = dict(meta, experts=[bound(e, compose(
            slot_line(k, j, text(tensors[k]), tuple(tensors[k].shape[1:]), parts.leaves[(k, j)]) for k in records))
            for j, e in enumerate(meta["experts"])])
    if finish is not None:
        meta = finish(meta)
    cfg.save(tmp / CONFIG)
    files = {**files, CONFIG: sha256_file(tmp / CONFIG), **{n: sha256_file(tmp / n) for n in hashed}}
    meta = {"format": MODEL_FORMAT, **carry_tokenizer(meta, tmp), "files": files}
    write_json(tmp / META, meta)
    from flexmoe.io.writer import kill_point

    kill_point("meta")
    return meta
