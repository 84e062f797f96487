"""A training checkpoint (`out_dir/checkpoints/step-N`) as a native model directory.

The checkpoint holds the trainable tensors (and the frozen ones only with
`trainer.checkpoint_frozen=true`); the rest are rebuilt exactly as the run built them: from its
`init_from` (whose files must still hash to what the run recorded) or from its seed. The model is
then written the way training writes `final/`, one tensor at a time, so the result is what
`final/` would have been had the run stopped at that step (without its last validation).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from flexmoe.config.parallel import ParallelConfig
from flexmoe.config.train import RunConfig, as_run_config
from flexmoe.io.files import check_output_dir, replace_dir, scratch_dir
from flexmoe.io.model_dir import CheckpointError
from flexmoe.train import checkpoint as ckpt
from flexmoe.train.build import build_for_training
from flexmoe.train.final import write_final
from flexmoe.train.optim import build_optimizer


def run_config_of(path: Path) -> tuple[RunConfig, dict[str, Any]]:
    """(the run's config, laid out for one process, and its trainer state) of checkpoint `path`."""
    if not (path / ckpt.MARKER).is_file():
        raise CheckpointError(f"{path}: not a complete flexmoe training checkpoint (no {ckpt.MARKER} marker); "
                              "pass a directory like RUN/checkpoints/step-00000100")
    if (path / ckpt.DEEPSPEED_TAG).is_dir():
        raise CheckpointError(f"{path}: written by DeepSpeed, whose format only DeepSpeed reads; resume the run "
                              "with parallel.engine=deepspeed to its end (final/), or set trainer.steps to this step")
    try:
        state = json.loads((path / ckpt.STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / ckpt.STATE}: unreadable ({e}); the checkpoint is damaged") from e
    stored = state.get("config") if isinstance(state, dict) else None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{path / ckpt.STATE}: records no run config; it was not written by flexmoe train")
    # one process on the CPU: the layout the run trained with does not change its tensors (DCP reshards)
    stored = dict(stored, parallel=dataclasses.asdict(ParallelConfig()), dry_run=False)
    try:
        cfg = as_run_config(OmegaConf.merge(OmegaConf.structured(RunConfig), stored))
    except Exception as e:  # noqa: BLE001  (a config this version cannot read: one line)
        raise CheckpointError(f"{path / ckpt.STATE}: its run config does not load ({str(e).splitlines()[0]}); "
                              "convert it with the flexmoe version that wrote it") from e
    return cfg, state


def checkpoint_to_model(path: str | Path, out: str | Path, *, overwrite: bool = False) -> dict[str, Any]:
    """Write checkpoint `path` as the native model directory `out`; returns what was written."""
    path, out = Path(path), Path(out)
    cfg, state = run_config_of(path)
    check_output_dir(out, overwrite, "--overwrite", CheckpointError)
    with scratch_dir(out) as tmp:
        cfg = dataclasses.replace(cfg, out_dir=str(tmp))
        built = build_for_training(cfg, None, torch.device("cpu"))
        # an optimizer to load into (DCP restores model and optimizer together); its states are dropped
        optimizer = build_optimizer(built.model, cfg.optim)
        loaded = ckpt.load_checkpoint(path, built.model, optimizer, frozen_from=built.source,
                                      config=dataclasses.asdict(cfg))
        del optimizer
        result = write_final(cfg, built, None, int(loaded.get("tokens_seen", 0)), {})
        check_output_dir(out, overwrite, "--overwrite", CheckpointError)
        replace_dir(tmp / "final", out)
    return dict(result, final=str(out), step=int(loaded.get("step", 0)), checkpoint=str(path))
