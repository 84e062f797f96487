"""What a run trains and validates on: data directories opened in `data.format`, and the training
mixture with the stage's public share."""

from __future__ import annotations

import json
from pathlib import Path

from flexmoe.config.train import DATA_FORMATS, RunConfig
from flexmoe.io.log import get_logger

log = get_logger(__name__)


def data_format(cfg: RunConfig) -> str:
    """`data.format` checked: `lm` (token windows) or `sft` (chat windows with a loss mask)."""
    fmt = cfg.data.format
    if fmt not in DATA_FORMATS:
        raise ValueError(f"data.format={fmt!r} is not one of {', '.join(DATA_FORMATS)}")
    return fmt


def open_windows(cfg: RunConfig, split: str, name: str, path: str):
    """The windows of one data directory in `data.format`; names the setting when it does not fit."""
    from flexmoe.data import TokenWindows
    from flexmoe.data.sft import SFTWindows

    if data_format(cfg) == "lm":
        return TokenWindows(path, cfg.data.seq_len, verify=cfg.data.verify)
    manifest = Path(path) / "manifest.json"
    try:
        fmt = json.loads(manifest.read_text()).get("format")
    except (OSError, ValueError):
        fmt = None
    if fmt != "flexmoe-sft/1":
        # A token-shard directory read as SFT would fail deep inside numpy; say what to run instead.
        raise ValueError(f"data.{split}.{name}={path}: not SFT data (data.format=sft needs a directory written by "
                         f"`flexmoe prepare-data --format sft`; manifest format {fmt!r})")
    return SFTWindows(path, cfg.data.seq_len, verify=cfg.data.verify)


def build_train_source(cfg: RunConfig):
    """The training mixture: data.train's domains, with `stage.public_mix` of each batch from `public`.

    With `data.format=sft` every domain (public included) must be SFT data: the loader then
    stacks dict windows, and a mixture of SFT domains samples exactly as one of token windows.
    """
    from flexmoe.data import Mixture

    if not cfg.data.train:
        raise ValueError("data.train is empty: give at least one domain, e.g. +data.train.code=DIR")
    unknown = sorted(set(cfg.data.weights) - set(cfg.data.train))
    if unknown:
        raise ValueError(f"data.weights names {unknown}, which are not in data.train ({sorted(cfg.data.train)})")
    weights = {name: float(cfg.data.weights.get(name, 1.0)) for name in cfg.data.train}
    mix = cfg.stage.public_mix
    if mix > 0:
        if "public" not in weights:
            raise ValueError("stage.public_mix > 0 needs a data.train.public source (+data.train.public=DIR)")
        own = {k: w for k, w in weights.items() if k != "public"}
        total = sum(own.values()) or 1.0
        weights = {k: (1 - mix) * w / total for k, w in own.items()} | {"public": mix}
    elif "public" in weights and len(weights) > 1:
        # Seen in the routing ablation: public_mix=0 meant "no public data" to its author, but the
        # public source was then sampled like any owner domain (half of every batch).
        share = weights["public"] / (sum(weights.values()) or 1.0)
        log.warning(f"stage.public_mix=0: data.train.public is weighed like the other domains "
              f"({share:.0%} of batches); set stage.public_mix for a fixed share, or leave it out for none")
    parts = {name: (open_windows(cfg, "train", name, cfg.data.train[name]), w)
             for name, w in weights.items() if w > 0}
    if len(parts) == 1:
        return next(iter(parts.values()))[0]
    return Mixture(parts)
