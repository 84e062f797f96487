"""A runnable model from a native model directory: the one place that joins storage and modules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flexmoe.io.model_dir import WEIGHTS, CONFIG, CheckpointError, load_model_dir
from flexmoe.model import Transformer


def load_model(src: str | Path, verify: bool = True, **cfg_overrides: Any):
    """Build a `Transformer` from a native model directory; returns (model, cfg, meta)."""
    cfg, sd, meta = load_model_dir(src, verify=verify)
    if cfg_overrides:
        cfg = cfg.replace(**cfg_overrides)
    model = Transformer(cfg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{Path(src) / WEIGHTS}: tensors do not fit {Path(src) / CONFIG} ({str(e).splitlines()[0]})") from e
    return model, cfg, meta
