"""The router tensors a merge stacks: the public model's shipped row and n-gram profile, each
package's rows, and the optional rescalings of the stacked rows (`merge --router-rows`).

All float32 numpy arrays: a merge only stacks them, so its path imports no torch (io.dtypes says
why); the rescalings compute in torch, as they always have, when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flexmoe.io.dtypes import FLOATING, float32_array, st_name
from flexmoe.io.errors import CheckpointError
from flexmoe.io.log import get_logger
from flexmoe.io.stream import FilePool, LazyTensor, read_header

log = get_logger(__name__)


def public_router_file(public_dir: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The public model's shipped router file and its tensors (router rows, n-gram profile): float
    ones as float32 arrays, others as lazy tensors (refused where used); read once."""
    name = (meta.get("router_embedding") or {}).get("router_public")
    if not name:
        return public_dir, {}
    tensors, _ = read_header(public_dir / name)
    with FilePool() as pool:
        return public_dir / name, {k: float32_of(t, pool) if t.st in FLOATING else t for k, t in tensors.items()}


def public_rows(public_dir: Path, shipped: dict[str, Any], cfg) -> np.ndarray:
    """The public model's router row per layer, `[L, D]` float32 (zeros, with a warning, when it ships
    none), checked finite and of the model's shape."""
    if "router_embedding" not in shipped:
        log.warning(f"{public_dir} ships no public router row; using zeros")
        return np.zeros((cfg.num_layers, cfg.d_model), np.float32)
    rows = shipped["router_embedding"]
    want = (cfg.num_layers, cfg.d_model)
    if tuple(rows.shape) != want or not isinstance(rows, np.ndarray) or not bool(np.isfinite(rows).all()):
        raise CheckpointError(f"{public_dir}: its public router row is {st_name(rows)} {tuple(rows.shape)}, the "
                              f"model needs finite floats of shape {want}")
    return rows


def ngram_profiles(public_file: Path, shipped: dict[str, Any], loaded, small, *, required: bool) -> np.ndarray | None:
    """`[N+1, buckets]` n-gram profiles when the public model and every package carry one; None
    otherwise, or an error naming what lacks one when the routing needs them."""
    rows = [(public_file, shipped.get("domain_ngram"))] + [(pkg / "expert.safetensors", s.get("domain_ngram"))
                                                           for (pkg, _, _), s in zip(loaded, small)]
    missing = [str(w) for w, r in rows if r is None]
    if missing:
        if required:
            raise CheckpointError(f"{missing[0]}: has no n-gram profile, which routing=anchor_ngram needs; re-run "
                                  "`flexmoe router-embed` (the public one with --public) and branch again")
        return None
    want = (rows[0][1].shape[-1],)
    for where, r in rows:
        if tuple(r.shape) != want or not isinstance(r, np.ndarray):
            raise CheckpointError(f"{where}: n-gram profile of shape {tuple(r.shape)} does not match the public "
                                  f"model's {want}; make every profile with one --ngram-buckets")
    return np.stack([r for _, r in rows])


def float32_of(t, pool: FilePool) -> np.ndarray:
    """A small tensor (lazy, or torch's from a Hugging Face input) as float32 values, as `.float()` gives."""
    if isinstance(t, LazyTensor):
        return float32_array(pool.read_bytes(t), t.st, t.shape)
    return t.detach().float().contiguous().numpy()


def transform_rows(how: str, rows: np.ndarray) -> np.ndarray:
    """The stacked rows `[E, D]` rescaled by ROW_TRANSFORMS[how] (raw: as they are)."""
    if how == "raw":
        return rows
    import torch  # the rescalings compute in torch, as they always have

    return ROW_TRANSFORMS[how](torch.from_numpy(rows)).numpy()


def _common_norm(rows_ED):
    """Every row scaled to the rows' mean norm: no owner wins tokens by a larger row alone."""
    norms = rows_ED.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return rows_ED / norms * norms.mean()


def _centred_norm(rows_ED):
    """Each owner's offset from the public row scaled to a common norm. (Centring alone changes
    nothing: every logit shifts by the same h . r_0, and the softmax ignores a shared shift.)"""
    off = rows_ED[1:] - rows_ED[:1]
    if off.shape[0] == 0:
        return rows_ED
    import torch

    n = off.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([rows_ED[:1], rows_ED[:1] + off / n * n.mean()])


ROW_TRANSFORMS = {"raw": lambda r: r, "common_norm": _common_norm, "centred_norm": _centred_norm}
