"""What a run needs to be reproduced, written next to its checkpoints as `run_info.json`: the
command line, the code's git revision, package versions and the data manifests' checksums.
(Hydra writes the resolved config itself, under `.hydra/`.)"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any
from flexmoe.io.files import atomic_write_text

PACKAGES = ("flexmoe", "torch", "numpy", "safetensors", "tokenizers", "hydra-core", "omegaconf",
            "transformers", "deepspeed", "opacus", "flash-attn", "wandb")


def git_revision(path: Path) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def data_checksums(dirs: dict[str, str]) -> dict[str, str | None]:
    """sha256 of each prepared directory's manifest.json (which itself lists every shard's sha256)."""
    out: dict[str, str | None] = {}
    for name, d in dirs.items():
        m = Path(d) / "manifest.json"
        out[name] = hashlib.sha256(m.read_bytes()).hexdigest() if m.is_file() else None
    return out


def write_run_info(out_dir: str | Path, cfg: Any) -> Path:
    """Write (or refresh on resume) `run_info.json`; earlier command lines are kept in `history`."""
    out = Path(out_dir) / "run_info.json"
    info = {
        "command": [sys.executable, *sys.argv], "cwd": os.getcwd(), "host": platform.node(),
        "python": sys.version.split()[0], "git_revision": git_revision(Path(__file__).resolve().parent),
        "packages": _versions(),
        "data": {**{f"train/{k}": v for k, v in data_checksums(dict(cfg.data.train)).items()},
                 **{f"val/{k}": v for k, v in data_checksums(dict(cfg.data.val)).items()}},
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    if out.exists():
        try:
            prev = json.loads(out.read_text())
            info["history"] = prev.get("history", []) + [{k: prev.get(k) for k in ("command", "git_revision")}]
        except json.JSONDecodeError:
            pass
    atomic_write_text(out, json.dumps(info, indent=1) + "\n")
    return out
