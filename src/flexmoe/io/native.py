"""Native model directories as lazy tensors: opened with every check, written streaming.

The same layout as `safetensors_io.save_model_dir` (config.json, model.safetensors with experts
stacked `[E, ...]`, flexmoe.json with file sha256s), for models too large to hold in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexmoe.config.model import ModelConfig
from flexmoe.io.keys import NATIVE_ONLY, native_shapes
from flexmoe.io.hf_dir import hf_architecture
from flexmoe.io.model_dir import CONFIG, META, WEIGHTS, CheckpointError, read_json, verify_files, write_json
from flexmoe.io.files import sha256_file
from flexmoe.io.stream import FilePool, LazyTensor, read_header, write_file


def open_native(src: str | Path, verify: bool = True) -> tuple[ModelConfig, dict[str, LazyTensor], dict[str, Any]]:
    """Config, lazy tensors and meta of a native directory; sha256s, key set and shapes checked."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a flexmoe model directory)")
    if not (src / CONFIG).is_file() and (src / "manifest.json").is_file():
        raise CheckpointError(f"{src}: is an expert package, not a model; merge it with the public model first")
    arch = hf_architecture(src)
    if arch is not None:
        raise CheckpointError(f"{src / CONFIG}: is a Hugging Face config ({arch}), not a flexmoe one; "
                              "`flexmoe import-hf` turns the directory into a native model")
    meta = read_json(src / META) if (src / META).is_file() else {}
    if verify:
        verify_files(src, meta)
    try:
        cfg = ModelConfig.load(src / CONFIG)
    except ValueError as e:
        raise CheckpointError(str(e).splitlines()[0]) from e
    tensors, _ = read_header(src / WEIGHTS)
    want = native_shapes(cfg)
    missing = sorted(set(want) - set(tensors) - set(NATIVE_ONLY))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has unexpected tensor {extra[0]}"
        raise CheckpointError(f"{src / WEIGHTS}: {what} for the model {src / CONFIG} describes")
    for k, shape in want.items():
        if k in tensors and tensors[k].shape != shape:
            raise CheckpointError(f"{src / WEIGHTS}: {k} has shape {list(tensors[k].shape)}, {src / CONFIG} implies {list(shape)}")
    return cfg, tensors, meta


def write_native(tmp: Path, cfg: ModelConfig, tensors: dict[str, LazyTensor], meta: dict[str, Any], pool: FilePool,
                 progress=None, hashed: tuple[str, ...] = ()) -> None:
    """Write a native directory's files into `tmp` (the caller's `atomic_dir`); meta gains the sha256s
    of the weights, the config and the files named in `hashed` (already in `tmp`)."""
    weights_sha = write_file(tmp / WEIGHTS, tensors, pool, metadata={"format": "pt"}, progress=progress)
    cfg.save(tmp / CONFIG)
    files = {WEIGHTS: weights_sha, CONFIG: sha256_file(tmp / CONFIG), **{n: sha256_file(tmp / n) for n in hashed}}
    write_json(tmp / META, dict(meta, files=files))
