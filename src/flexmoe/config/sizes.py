"""Byte sizes as users write them ('5GB', '500MiB', a byte count): --max-shard-size and
trainer.max_shard_size."""

from __future__ import annotations


def parse_size(text: str | int | None) -> int | None:
    """'5GB' (decimal, as Hugging Face counts), '500MiB' or a plain byte count -> bytes; None stays None."""
    import re

    if text is None:
        return None
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or 2GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])
