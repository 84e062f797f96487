"""Release without one owner's expert: its FFN tensors and router rows physically gone.

Opt-out masks an expert at inference; a release that must not carry an expert at all (its
owner withdrew consent) drops it. The result computes what the source model computes with that
expert masked, and is checked byte for byte to hold no slice of the removed expert.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any

import torch

from flexmoe.io.native import open_native, write_native
from flexmoe.io.progress import Progress
from flexmoe.io.model_dir import WEIGHTS, CheckpointError, atomic_dir
from flexmoe.io.stream import FilePool, LazyTensor, read_header, stack
from flexmoe.io.keys import is_per_expert_key

# Tensors with one slice per expert along dim 0.


def remove_expert(src: str | Path, dst: str | Path, name: str, *, overwrite: bool = False) -> Path:
    """Write `src` without the expert whose owner or domain is `name`; returns `dst`.

    Refuses slot 0 (the public expert every other one was trained against), unknown or
    ambiguous names, and any result in which a slice of the removed expert survives.
    """
    src = Path(src)
    cfg, tensors, meta = open_native(src)
    experts = meta.get("experts") or []
    if not cfg.is_moe or len(experts) != cfg.num_experts:
        raise CheckpointError(f"{src / 'flexmoe.json'}: lists {len(experts)} experts for a model with "
                              f"num_experts={cfg.num_experts}; remove-expert needs a merged model")
    slot = _find_slot(src, experts, name)
    keep = [j for j in range(cfg.num_experts) if j != slot]
    out = {k: stack([t[j] for j in keep]) if is_per_expert_key(k) else t for k, t in tensors.items()}
    removed_slices = {f"{k}[{slot}]": t[slot] for k, t in tensors.items() if is_per_expert_key(k)}
    new_cfg = cfg.replace(num_experts=len(keep), top_k=min(cfg.top_k, len(keep)))
    removed = dict(experts[slot], removed=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    new_meta = dict(meta, experts=[dict(experts[j], slot=i) for i, j in enumerate(keep)],
                    removed=list(meta.get("removed") or []) + [removed])
    with FilePool() as pool, atomic_dir(dst, overwrite=overwrite) as tmp:
        secrets = _digests(removed_slices, pool)
        progress = Progress(f"remove-expert {name}", sum(t.nbytes for t in out.values()))
        write_native(tmp, new_cfg, out, new_meta, pool, progress)
        _prove_absent(tmp / WEIGHTS, secrets, src, pool)
        progress.finish(f"expert {slot} ({experts[slot]['owner']}/{experts[slot]['domain']}) removed -> {dst}")
    return Path(dst)


def _find_slot(src: Path, experts: list[dict[str, Any]], name: str) -> int:
    hits = [j for j, e in enumerate(experts) if name in (e.get("owner"), e.get("domain"))]
    known = sorted({e.get("owner") for e in experts[1:]} | {e.get("domain") for e in experts[1:]})
    if not hits:
        raise CheckpointError(f"{src / 'flexmoe.json'}: no expert named {name!r}; known owners/domains: {known}")
    if 0 in hits:
        raise CheckpointError(f"{src / 'flexmoe.json'}: {name!r} is slot 0, the public expert every other expert was "
                              "trained against; it cannot be removed (known owners/domains: " + ", ".join(known) + ")")
    if len(hits) > 1:
        raise CheckpointError(f"{src / 'flexmoe.json'}: {name!r} names experts {hits}; give a domain that names one")
    return hits[0]


def _digests(slices: dict[str, LazyTensor], pool: FilePool) -> dict[str, str]:
    """sha256 -> name of each slice of the removed expert that could identify it.

    Left out: scalars (a router bias value is one float, equal to countless others by chance)
    and all-zero slices (an unset router row says nothing about the owner and equals every other
    unset row).
    """
    out = {}
    for key, t in slices.items():
        if not t.shape:
            continue
        h, nonzero = hashlib.sha256(), False
        for c in pool.chunks(t):
            h.update(c)
            nonzero = nonzero or bool(torch.frombuffer(c, dtype=torch.uint8).any())
        if nonzero:
            out[h.hexdigest()] = key
    return out


def _prove_absent(weights: Path, secrets: dict[str, str], src: Path, pool: FilePool) -> None:
    """Read the written file back: no tensor, and no slice along dim 0 of one, may equal a removed slice."""
    tensors, _ = read_header(weights)
    for key, t in tensors.items():
        parts = {key: t} | ({f"{key}[{j}]": t[j] for j in range(t.shape[0])} if len(t.shape) >= 2 else {})
        for part_key, part in parts.items():
            hit = secrets.get(pool.digest(part))
            if hit is not None:
                raise CheckpointError(f"{src / WEIGHTS}: the removed expert's {hit} is byte-identical to {part_key} of "
                                      "the release (an untrained copy?), so the release cannot prove it is gone")
