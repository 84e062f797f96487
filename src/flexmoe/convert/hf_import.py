"""`flexmoe import-hf`: a Hugging Face Olmo2 / FlexOlmo directory -> a native model directory, streamed."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flexmoe.io.extras import ROUTER_PUBLIC, read_extras, with_profile_buckets
from flexmoe.io.hf_dir import copy_tokenizer, expert_names, open_hf_dir
from flexmoe.io.native import write_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import META, atomic_dir, read_json
from flexmoe.io.stream import FilePool, stream_fingerprint

TOKENIZER_DIR = "tokenizer"


def import_hf(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> Path:
    """Convert an HF checkpoint directory into a native model directory at `dst`.

    Dense Olmo2 becomes a public model (meta `fingerprint`); FlexOlmo becomes an anchor
    (2 experts) or merged model with its `experts` names and `base_fingerprint` (slot 0 is the
    anchor). Tokenizer files travel along into `dst/tokenizer/`.
    """
    src = Path(src)
    ck = open_hf_dir(src)
    native_only, router_public = read_extras(src, ck.cfg)
    cfg = with_profile_buckets(ck.cfg, native_only)  # n-gram profiles carried by export-hf stay usable
    tensors = dict(sorted({**ck.native(), **native_only}.items()))
    with FilePool() as pool, atomic_dir(dst, overwrite=overwrite) as tmp:
        # The fingerprint pass reads the shared tensors once more; it comes first so a
        # checkpoint that fails to read fails before anything is written.
        fp = stream_fingerprint(tensors, pool)
        meta: dict[str, Any] = {"source": {"format": "hf", "architecture": ck.architecture, "path": str(src)}}
        if cfg.is_moe:
            meta.update(kind="anchor" if cfg.num_experts == 2 else "merged", base_fingerprint=fp,
                        experts=expert_names(src, cfg.num_experts))
            src_meta = read_json(src / META) if (src / META).is_file() else {}
            if src_meta.get("removed"):
                meta["removed"] = src_meta["removed"]
        else:
            meta.update(kind="public", fingerprint=fp)
        if copy_tokenizer(src, tmp / TOKENIZER_DIR):
            meta["tokenizer"] = {"type": "hf", "path": TOKENIZER_DIR}  # relative to the model directory
        hashed: tuple[str, ...] = ()
        if router_public is not None:  # the public row merge needs, carried by export-hf
            shutil.copy2(router_public, tmp / ROUTER_PUBLIC)
            meta["router_embedding"], hashed = {"router_public": ROUTER_PUBLIC}, (ROUTER_PUBLIC,)
        progress = Progress(f"import-hf {src.name}", sum(t.nbytes for t in tensors.values()))
        write_native(tmp, cfg, tensors, meta, pool, progress, hashed=hashed)
        progress.finish(f"{len(tensors)} tensors -> {dst}")
    return Path(dst)
