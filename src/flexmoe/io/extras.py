"""What a Hugging Face directory has no place for rides along in its `flexmoe/` subfolder.

The public model's router row (merge takes row 0 from it) and native-only tensors (document
routing's `domain_centroids` and `domain_ngrams`) would be lost in an HF export, and an HF import or an HF public
model in `merge` would get zeros instead. They sit in a subfolder because vLLM and others load
every `*.safetensors` at the top level of a checkpoint directory; flexmoe.json points at them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import NATIVE_ONLY, native_shapes
from flexmoe.io.model_dir import META, CheckpointError
from flexmoe.io.schema import HF_META, read_record
from flexmoe.io.castwrite import write_file
from flexmoe.io.stream import FilePool, LazyTensor, read_header

EXTRA_DIR = "flexmoe"
NATIVE_ONLY_FILE = f"{EXTRA_DIR}/native_only.safetensors"
ROUTER_PUBLIC = "router_public.safetensors"


def write_extras(src: Path, tmp: Path, native: dict[str, LazyTensor], meta: dict[str, Any], pool: FilePool) -> dict[str, Any]:
    """Copy the extras of native directory `src` into HF directory `tmp`; returns flexmoe.json entries."""
    out: dict[str, Any] = {}
    extra = {k: native[k] for k in NATIVE_ONLY if k in native}
    if extra:
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        write_file(tmp / NATIVE_ONLY_FILE, extra, pool, metadata={"format": "pt"}, digest=False)
        out["native_only"] = NATIVE_ONLY_FILE
    name = (meta.get("router_embedding") or {}).get("router_public")
    if name and (src / name).is_file():
        (tmp / EXTRA_DIR).mkdir(exist_ok=True)
        shutil.copy2(src / name, tmp / EXTRA_DIR / ROUTER_PUBLIC)
        out["router_embedding"] = {"router_public": f"{EXTRA_DIR}/{ROUTER_PUBLIC}"}
    return out


def with_profile_buckets(cfg: ModelConfig, native_only: dict[str, LazyTensor]) -> ModelConfig:
    """`cfg` with `doc_ngram_buckets` taken from carried n-gram profiles: HF config.json has no
    field for it."""
    t = native_only.get("domain_ngrams")
    return cfg if t is None else cfg.replace(doc_ngram_buckets=int(t.shape[-1]))


def read_extras(hf_dir: Path, cfg: ModelConfig) -> tuple[dict[str, LazyTensor], Path | None]:
    """(native-only tensors, public router row file or None) of an HF directory written by export-hf."""
    meta = read_record(hf_dir / META, HF_META) if (hf_dir / META).exists() else {}
    tensors: dict[str, LazyTensor] = {}
    if meta.get("native_only"):
        f = _inside(hf_dir, meta["native_only"])
        header = read_header(f)[0]
        want = native_shapes(with_profile_buckets(cfg, header))
        for k, t in header.items():
            if k not in NATIVE_ONLY or t.shape != want.get(k):
                raise CheckpointError(f"{f}: {k} {list(t.shape)} does not belong to the model {hf_dir / 'config.json'} "
                                      "describes; remove the file or re-export")
            tensors[k] = t
    router = (meta.get("router_embedding") or {}).get("router_public")
    return tensors, (_inside(hf_dir, router) if router else None)


def _inside(root: Path, name: str) -> Path:
    """`root / name`, refusing names that leave `root` (flexmoe.json comes from someone else)."""
    p = Path(name)
    if p.is_absolute() or ".." in p.parts:
        raise CheckpointError(f"{root / META}: names {name!r} outside the directory")
    if not (root / p).is_file():
        raise CheckpointError(f"{root / p}: missing, though {root / META} names it")
    return root / p
