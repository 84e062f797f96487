"""Proxy sets for router tuning: a stated fraction of each owner's windows, sampled evenly and
deterministically, written as ordinary token shards (one prepared directory per domain)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flexmoe.data.dataset import TokenWindows
from flexmoe.data.errors import DataError
from flexmoe.io.files import atomic_output_dir, sha256_file


def sample_proxy(data_dir: str | Path, out_dir: str | Path, fraction: float, seq_len: int, *, seed: int = 0,
                 overwrite: bool = False) -> dict:
    """Write `fraction` of `data_dir`'s windows (at least one) to `out_dir`; returns the manifest."""
    if not 0 < fraction <= 1:
        raise DataError(f"proxy fraction {fraction} must be in (0, 1]")
    src = TokenWindows(data_dir, seq_len)
    n = max(1, round(len(src) * fraction))
    idx = np.sort(np.random.default_rng(seed).choice(len(src), size=n, replace=False))
    tokens = np.concatenate([src[int(i)][:-1] for i in idx] + [src[int(idx[-1])][-1:]])
    dtype = np.dtype(src.manifest["dtype"])
    with atomic_output_dir(out_dir, overwrite=overwrite, error=DataError) as tmp:
        np.save(tmp / "shard-00000.npy", tokens.astype(dtype))
        manifest = {
            "format": "flexmoe-tokens/1", "domain": src.domain, "tokenizer": src.manifest["tokenizer"],
            "dtype": str(dtype), "num_tokens": int(len(tokens)), "num_documents": int(n),
            "shards": [{"path": "shard-00000.npy", "num_tokens": int(len(tokens)),
                        "sha256": sha256_file(tmp / "shard-00000.npy")}],
            "sources": [{"path": str(data_dir), "proxy_fraction": fraction, "windows": int(n), "seed": seed}],
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
