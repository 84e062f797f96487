"""Training checkpoints: torch.distributed.checkpoint directories written atomically.

Layout: `out_dir/checkpoints/step-00000100/` holding the DCP shards (model, optimizer, RNG) and
`trainer_state.json` (step, data-loader position, resolved config). A checkpoint counts only once
its `COMPLETE` marker exists; it is written under a temporary name and renamed, so a kill during
the write leaves the previous checkpoint as the newest complete one.

Every rank writes its own shards (DCP); rank 0 alone writes the marker and renames, after a
barrier that proves all shards are on disk. DCP stores DTensors by global offsets, so a
checkpoint saved at one layout (FSDP, TP, EP, any world size) loads at another as long as the
parameter names match (they do: parallel/ never renames). The data-loader position is JSON and
rank-independent while batch_size x data-parallel size stays the same. A DeepSpeed engine writes
its own format into a `deepspeed/` sub-directory instead, resumable by DeepSpeed at the same
world size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER, STATE = "COMPLETE", "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    keep_last: int = 2, engine=None) -> Path:
    """Write `root/step-N` atomically (a collective: every rank calls it). `engine`: a DeepSpeed
    engine, which then saves model and optimizer in its own format."""
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if engine is not None:
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={}, save_latest=False)
    else:
        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd, "rng": torch.get_rng_state()}, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / STATE).write_text(json.dumps(dict(trainer_state, step=step), indent=1, default=str))
        (tmp / MARKER).write_text("ok\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def load_checkpoint(path: str | Path, model, optimizer, engine=None) -> dict[str, Any]:
    """Restore model, optimizer and RNG in place (a collective); returns the trainer state (step,
    loader, ...). `engine`: a DeepSpeed engine, for checkpoints it wrote."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    is_ds = (path / DEEPSPEED_TAG).is_dir()
    if is_ds != (engine is not None):
        raise ValueError(f"{path}: written by {'DeepSpeed' if is_ds else 'the fsdp engine (DCP)'}; resume with "
                         f"parallel.engine={'deepspeed' if is_ds else 'fsdp'} or start a new out_dir")
    if engine is not None:
        engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        return json.loads((path / STATE).read_text())
    msd, osd = get_state_dict(model, optimizer)
    state = {"model": msd, "optim": osd, "rng": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    torch.set_rng_state(state["rng"])
    return json.loads((path / STATE).read_text())
