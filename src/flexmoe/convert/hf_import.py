"""`flexmoe import-hf`: a Hugging Face Olmo2 / FlexOlmo directory -> a native model directory, streamed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flexmoe.io.extras import ROUTER_PUBLIC, read_extras, with_profile_buckets
from flexmoe.io.hf_dir import copy_tokenizer, expert_names, open_hf_dir
from flexmoe.io.fingerprint import TENSOR_SHA256_FORMAT, bound, record_format
from flexmoe.io.native import expert_tap, parse_size, write_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import META, CheckpointError, atomic_dir, refuse_overlap
from flexmoe.io.schema import HF_META, read_record
from flexmoe.io.stream import FilePool, stream_fingerprint

TOKENIZER_DIR = "tokenizer"


def import_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False,
              max_shard_size: int | str | None = None) -> Path:
    """Convert an HF checkpoint directory into a native model directory at `dst`.

    Dense Olmo2 becomes a public model (meta `fingerprint`); FlexOlmo becomes an anchor
    (2 experts) or merged model with its `experts` names and `base_fingerprint` (slot 0 is the
    anchor). Tokenizer files travel along into `dst/tokenizer/`. `max_shard_size` (bytes or
    '5GB'): native shards with an index instead of one model.safetensors.
    """
    src = Path(src)
    limit = parse_size(max_shard_size)
    refuse_overlap(dst, [src], "DST")
    ck = open_hf_dir(src)
    native_only, router_public = read_extras(src, ck.cfg)
    cfg = with_profile_buckets(ck.cfg, native_only)  # n-gram profiles carried by export-hf stay usable
    tensors = dict(sorted({**ck.native(), **native_only}.items()))
    with FilePool() as pool, atomic_dir(dst, overwrite=overwrite, flag="--overwrite") as tmp:
        # The fingerprint pass reads the shared tensors once more; it comes first so a
        # checkpoint that fails to read fails before anything is written.
        fp = stream_fingerprint(tensors, pool)
        meta: dict[str, Any] = {"source": {"format": "hf", "architecture": ck.architecture, "path": str(src)}}
        tap = None
        if cfg.is_moe:
            # Hashes an export carried must match the slots (checked after the pass that computes
            # them, before the rename); every expert is bound from here on.
            meta.update(kind="anchor" if cfg.num_experts == 2 else "merged", base_fingerprint=fp,
                        experts=expert_names(src, cfg.num_experts))
            src_meta = read_record(src / META, HF_META) if (src / META).is_file() else {}
            if src_meta.get("removed"):
                meta["removed"] = src_meta["removed"]
            # Each slot is bound afresh; a hash an export carried is checked in its own format.
            tap = expert_tap(cfg, [[j, (j, record_format(e))] for j, e in enumerate(meta["experts"])])
        else:
            meta.update(kind="public", fingerprint=fp)
        if _is_flexmoe_bytes(src):  # an export of a bytes model: ids are bytes, as data made with --tokenizer bytes
            meta["tokenizer"] = "bytes"
        elif copy_tokenizer(src, tmp / TOKENIZER_DIR):
            meta["tokenizer"] = {"type": "hf", "path": TOKENIZER_DIR}  # relative to the model directory
        hashed: tuple[str, ...] = ()
        if router_public is not None:  # the public row merge needs, carried by export-hf
            shutil.copy2(router_public, tmp / ROUTER_PUBLIC)
            meta["router_embedding"], hashed = {"router_public": ROUTER_PUBLIC}, (ROUTER_PUBLIC,)
        progress = Progress(f"import-hf {src.name}", sum(t.nbytes for t in tensors.values()))
        write_native(tmp, cfg, tensors, meta, pool, progress, hashed=hashed, max_shard_size=limit,
                     taps=(tap,) if tap else (), finish=(lambda m: _bind(m, tap, src / META)) if tap else None)
        progress.finish(f"{len(tensors)} tensors -> {dst}")
    return Path(dst)


def _bind(meta: dict[str, Any], tap, listed_in: Path) -> dict[str, Any]:
    """Each expert record gets its slot's tensor_sha256; one an export carried must equal it."""
    digests, experts = tap.digests(), []
    for j, e in enumerate(meta["experts"]):
        if e.get("tensor_sha256") not in (None, digests[(j, j, record_format(e))]):
            raise CheckpointError(f"{listed_in}: expert slot {j} ({e.get('owner')}/{e.get('domain')}) does not "
                                  "match its tensor_sha256; the expert was swapped or altered, do not use this model")
        experts.append(bound(e, digests[(j, j, TENSOR_SHA256_FORMAT)]))
    return dict(meta, experts=experts)


def _is_flexmoe_bytes(src: Path) -> bool:
    """True for the HF form of flexmoe's byte tokenizer (data/tokenize.write_hf_byte_tokenizer)."""
    import json

    try:
        config = json.loads((Path(src) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("flexmoe_tokenizer") == "bytes"
