"""Helpers for the data-layer tests (a uniquely named module: `conftest` clashes across test folders)."""

from __future__ import annotations

import random
from pathlib import Path

from flexmoe.data import ByteTokenizer, prepare_data


def make_prepared(root: Path, name: str, text: str, *, shard_tokens: int = 1 << 20, domain: str | None = None) -> Path:
    """Write `text` as one document and prepare it with the byte tokenizer; return the dir."""
    src = root / f"{name}.txt"
    src.write_text(text, encoding="utf-8")
    out = root / name
    prepare_data([src], out, ByteTokenizer(), shard_tokens=shard_tokens, domain=domain or name, progress=False)
    return out


def random_text(n: int, seed: int, alphabet: str = "abcdefghijklmnopqrstuvwxyz ") -> str:
    """Seeded random text, so windows cut from it are (practically) all distinct."""
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))
