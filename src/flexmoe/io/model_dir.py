"""Native model directories: `config.json` + `model.safetensors` + `flexmoe.json`, written atomically.

Everything here is safetensors and JSON: nothing that crosses an organisation is a pickle.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from flexmoe.io.files import atomic_output_dir, sha256_file  # noqa: F401  (re-exported)

from flexmoe.config.model import ModelConfig

CONFIG, WEIGHTS, META = "config.json", "model.safetensors", "flexmoe.json"


class CheckpointError(ValueError):
    """A checkpoint or package on disk is missing, corrupted or does not fit."""


def atomic_dir(dst: str | Path, overwrite: bool = False):
    """Yield a temp dir beside `dst`; rename it to `dst` only if the block finishes."""
    return atomic_output_dir(dst, overwrite=overwrite, error=CheckpointError)


def write_json(path: str | Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def save_model_dir(dst: str | Path, cfg: ModelConfig, state_dict: dict[str, torch.Tensor], meta: dict[str, Any],
                   extra_files: dict[str, Path] | None = None, overwrite: bool = False) -> Path:
    """Write a native model directory atomically; `meta` lands in flexmoe.json with file sha256s."""
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        cfg.save(tmp / CONFIG)
        save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
        for name, src in (extra_files or {}).items():
            if Path(src).is_dir():
                shutil.copytree(src, tmp / name)
            else:
                shutil.copy2(src, tmp / name)
        meta = dict(meta, files={WEIGHTS: sha256_file(tmp / WEIGHTS), CONFIG: sha256_file(tmp / CONFIG)})
        write_json(tmp / META, meta)
    return Path(dst)


def verify_files(src: Path, meta: dict[str, Any]) -> None:
    """Every file listed in flexmoe.json's `files` must exist with its recorded sha256."""
    for name, digest in meta.get("files", {}).items():
        if not (src / name).is_file():
            raise CheckpointError(f"{src / name}: missing")
        if sha256_file(src / name) != digest:
            raise CheckpointError(f"{src / name}: sha256 does not match {src / META}; the file is corrupted")


def load_model_dir(src: str | Path, verify: bool = True) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """Read a native model directory; with `verify`, file sha256s must match flexmoe.json."""
    src = Path(src)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a directory (expected a flexmoe model directory)")
    meta = read_json(src / META) if (src / META).exists() else {}
    if verify:
        verify_files(src, meta)
    cfg = ModelConfig.load(src / CONFIG)
    try:
        sd = load_file(str(src / WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{src / WEIGHTS}: cannot read safetensors ({e})") from e
    return cfg, sd, meta
