"""Checks of a command's own inputs that several subcommands share: numbers that must be positive,
text files given by flag, data that must fit the model, outputs that must not overwrite inputs."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def require_positive(p: argparse.ArgumentParser, a: argparse.Namespace, *flags: str) -> None:
    """Usage error (exit 2, naming the flag) for any of `flags` below 1."""
    for flag in flags:
        value = getattr(a, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            p.error(f"{flag} {value}: must be >= 1")


def read_text_arg(path: str, flag: str) -> str:
    """The UTF-8 text of the file a flag names, or a ValueError naming the flag and the path."""
    f = Path(path)
    if not f.exists():
        raise ValueError(f"{flag} {path}: no such file; give a text file")
    if not f.is_file():
        raise ValueError(f"{flag} {path}: not a file (a directory?); give a text file")
    try:
        return f.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path}: not UTF-8 text (byte {e.start}); convert it to UTF-8") from e


def check_data_for_model(windows, cfg, meta: dict, model_dir: str, setting: str, seq_len: int | None = None) -> None:
    """Refuse data of another tokenizer or with ids past the model's vocabulary, and a window length
    past the model's max_seq_len, naming `setting` (e.g. `--data code`)."""
    from flexmoe.data.fit import check_data_fits_model

    if seq_len is not None and seq_len > cfg.max_seq_len:
        raise ValueError(f"--seq-len {seq_len}: exceeds {model_dir}'s max_seq_len {cfg.max_seq_len}; lower --seq-len")
    check_data_fits_model(windows, cfg.vocab_size, meta.get("tokenizer"), setting=setting, model=str(model_dir),
                          model_dir=model_dir)


def finite_or_none(value: float) -> float | None:
    """`value`, or None for nan/inf (JSON has no NaN: stdout must stay parseable)."""
    return value if math.isfinite(value) else None
