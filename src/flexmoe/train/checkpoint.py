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

Frozen tensors (requires_grad False: the anchor expert, and everything shared under expert_anchor)
are not written: a run rebuilds them from `init_from` (or the seed) before it resumes, and
`trainer_state.json` records where they came from (`frozen_from`: init_from's file sha256s), which
the resuming run must match. `keep_frozen=True` writes them too; a checkpoint holding them loads
the same way (they are simply not read).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

MARKER, STATE = "COMPLETE", "trainer_state.json"
DEEPSPEED_TAG = "deepspeed"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# A checkpoint being written in the background (trainer.async_save): its future and what makes it
# count (the state file, the marker, the rename), done once every rank's shards are on disk.
_PENDING: tuple[Any, Any] | None = None
_ASYNC_GROUP = None


def save_checkpoint(root: str | Path, step: int, model, optimizer, trainer_state: dict[str, Any],
                    keep_last: int = 2, engine=None, keep_frozen: bool = False, async_save: bool = False) -> Path:
    """Write `root/step-N` atomically (a collective: every rank calls it). `engine`: a DeepSpeed
    engine, which then saves model and optimizer in its own format. Frozen tensors are left out
    unless `keep_frozen`. `async_save`: DCP copies the state and writes it in the background; the
    checkpoint counts (marker, rename) once `poll_pending` or `finish_pending` sees it written, and
    until then the previous one is the newest complete checkpoint."""
    global _PENDING
    finish_pending()  # one checkpoint in flight at a time
    root = Path(root)
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    state_json = json.dumps(dict(trainer_state, step=step), indent=1, default=str)  # as of now, not of the finish

    def complete() -> None:
        _barrier()  # every rank's shards are on disk
        if _rank() == 0:
            (tmp / STATE).write_text(state_json)
            (tmp / MARKER).write_text("ok\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    if engine is not None:
        engine.save_checkpoint(str(tmp), tag=DEEPSPEED_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=not keep_frozen)
    else:
        msd, osd = get_state_dict(model, optimizer)
        if not keep_frozen:
            msd = _trainable_only(model, msd)
        state = {"model": msd, "optim": osd, "rng": torch.get_rng_state()}
        with _single_process_quiet():
            if async_save:
                _PENDING = (dcp.async_save(state, checkpoint_id=str(tmp), process_group=_async_group()), complete)
                return final
            dcp.save(state, checkpoint_id=str(tmp))
    complete()
    return final


def _async_group():
    """A process group of its own for background checkpoint collectives, so they never interleave
    with the training step's (FSDP all-gathers on the default group)."""
    global _ASYNC_GROUP
    if dist.is_initialized() and dist.get_world_size() > 1 and _ASYNC_GROUP is None:
        _ASYNC_GROUP = dist.new_group(backend="gloo")
    return _ASYNC_GROUP


def poll_pending() -> None:
    """Complete the background checkpoint if every rank has written it (call once per step on
    every rank; the ranks agree before any of them takes the collective finish)."""
    if _PENDING is None:
        return
    done = _PENDING[0].done()
    if dist.is_initialized() and dist.get_world_size() > 1:
        # on the default group, from the training thread: the background writer owns the other one
        flag = torch.tensor([1 if done else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        done = bool(flag.item())
    if done:
        finish_pending()


def finish_pending() -> None:
    """Wait for the background checkpoint, if any, and make it count (a collective)."""
    global _PENDING
    if _PENDING is None:
        return
    fut, complete = _PENDING
    _PENDING = None
    fut.result()
    complete()


@contextlib.contextmanager
def _single_process_quiet():
    # DCP warns on every save and load of a one-process run ("torch.distributed is disabled ...
    # assuming the intent is to save in a single process"): that is the intent, so the warning
    # would only be noise in every user's log.
    with warnings.catch_warnings():
        if not dist.is_initialized():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def complete_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MARKER).is_file())


def _trainable_only(model, msd: dict[str, Any]) -> dict[str, Any]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in msd.items() if k in names}


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _identity(config: dict[str, Any]) -> dict[str, Any]:
    """The settings a checkpoint's tensors depend on: the model (when not taken from init_from,
    whose files `frozen_from` pins), whether there is an init_from, the freeze plan and the data format."""
    # init_from by presence only: its content is pinned by `frozen_from` (file sha256s), and a
    # moved copy of the same model resumes
    ident = {"init_from": bool(config.get("init_from")), "stage.freeze": (config.get("stage") or {}).get("freeze"),
             "data.format": (config.get("data") or {}).get("format")}
    if not config.get("init_from"):
        ident.update(_flat(config.get("model") or {}, "model"))
    return ident


def config_mismatch(saved: dict[str, Any] | None, current: dict[str, Any] | None) -> list[str]:
    """`setting: checkpoint's value -> this run's` for every identity setting that differs."""
    if not saved or not current:
        return []
    a, b = _identity(json.loads(json.dumps(saved, default=str))), _identity(json.loads(json.dumps(current, default=str)))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def load_checkpoint(path: str | Path, model, optimizer, engine=None, frozen_from: Any = None,
                    config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore the trainable tensors, optimizer and RNG in place (a collective); returns the trainer
    state (step, loader, ...). The frozen tensors are the model's own, rebuilt from `frozen_from`
    (init_from's file sha256s, or the seed), which must be what the checkpoint's run started from.
    `engine`: a DeepSpeed engine, for checkpoints it wrote. `config`: this run's resolved config;
    a checkpoint of another model, init_from, freeze plan or data format is refused, naming what differs."""
    path = Path(path)
    if not (path / MARKER).is_file():
        raise ValueError(f"{path}: incomplete checkpoint (no {MARKER} marker)")
    state = json.loads((path / STATE).read_text())
    differs = config_mismatch(state.get("config"), config)
    if differs:
        raise ValueError(f"{path.parent.parent}: holds a checkpoint of another run ({'; '.join(differs[:4])}"
                         f"{'; ...' if len(differs) > 4 else ''}); choose a new out_dir, or the settings it was made with")
    was = state.get("frozen_from")
    if frozen_from is not None and was is not None and was != json.loads(json.dumps(frozen_from, default=str)):
        raise ValueError(f"{path}: was trained from {was}, this run starts from {frozen_from}; its frozen tensors "
                         "would differ: resume with the same init_from (and trainer.seed), or start a new out_dir")
    is_ds = (path / DEEPSPEED_TAG).is_dir()
    if is_ds != (engine is not None):
        raise ValueError(f"{path}: written by {'DeepSpeed' if is_ds else 'the fsdp engine (DCP)'}; resume with "
                         f"parallel.engine={'deepspeed' if is_ds else 'fsdp'} or start a new out_dir")
    if engine is not None:
        # frozen tensors were left out of it (they are the model's own, from frozen_from)
        engine.load_checkpoint(str(path), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False, load_module_strict=False)
        return state
    msd, osd = get_state_dict(model, optimizer)
    loaded = {"model": _trainable_only(model, msd), "optim": osd, "rng": torch.get_rng_state()}
    try:
        with _single_process_quiet():
            dcp.load(loaded, checkpoint_id=str(path))
    except (RuntimeError, KeyError) as e:  # DCP's "Missing key in checkpoint state_dict" and the like
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: does not fit this run's model ({first[:200]}); choose a new out_dir, or resume "
                         "with the settings the checkpoint was made with") from e
    set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"],
                   options=StateDictOptions(strict=False))
    torch.set_rng_state(loaded["rng"])
    return state
