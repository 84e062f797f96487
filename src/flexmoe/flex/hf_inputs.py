"""Hugging Face checkpoints as merge inputs: a 2-expert FlexOlmo anchor as an expert package, and a
dense Olmo2 directory as the public model.

A 2-expert FlexOlmo checkpoint is what an owner who trained with another FlexOlmo stack
publishes: slot 0 the public FFN, slot 1 their expert. It can join a merge only if it was
branched from the very public model being merged, so every shared tensor and expert 0 must
match it (same fingerprint); router row 0 is ignored, the public row comes from the public model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexmoe.config.model import ModelConfig
from flexmoe.io.extras import read_extras
from flexmoe.io.fingerprint import verify_expert_hashes
from flexmoe.io.hf_dir import HF_CONFIG, INDEX, SINGLE, listed_expert_names, open_hf_dir
from flexmoe.io.model_dir import CheckpointError
from flexmoe.io.stream import FilePool, LazyTensor, stream_fingerprint
from flexmoe.io.keys import EXPERT_WEIGHTS, experts_key, package_router_key, package_weight_key, router_weight_key

FORMAT = "hf-flexolmo-anchor"


def read_hf_anchor(hf_dir: str | Path, public_fingerprint: str, public_sd: dict[str, Any] | None = None,
                   verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
    """(manifest, tensors) shaped like `flex.package.open_package`'s, from a 2-expert FlexOlmo directory:
    slot 1's weights and router rows as lazy tensors (byte spans), the small routing tensors in memory.

    With `verify`, expert records that carry a tensor_sha256 (an export-hf of a flexmoe model) must
    match the slots' tensors. Slot 0 and the shared tensors are read once, to prove they are the
    public model's (their fingerprint); slot 1 is read again when merge copies it.

    `public_sd` (the dense public state dict, in memory or lazy), when given, lets a refusal name the
    shard that holds the first tensor that differs.
    """
    hf_dir = Path(hf_dir)
    ck = open_hf_dir(hf_dir)
    cfg = ck.cfg
    if cfg.num_experts != 2:
        raise CheckpointError(f"{hf_dir / HF_CONFIG}: {ck.architecture} with num_experts={cfg.num_experts}; merge takes "
                              "2-expert FlexOlmo checkpoints (public expert + one owner's) or expert packages")
    native_only, _ = read_extras(hf_dir, cfg)
    native = {**ck.native(), **native_only}
    named = listed_expert_names(hf_dir, 2)
    with FilePool() as pool:
        if verify and named:
            verify_expert_hashes(native, {"experts": named}, cfg.num_layers, hf_dir, chunks=pool.chunks)
        fp = stream_fingerprint(native, pool)
        if fp != public_fingerprint:
            where = _first_difference(native, public_sd, pool) if public_sd is not None else None
            at = where or (hf_dir / (INDEX if (hf_dir / INDEX).is_file() else SINGLE))
            raise CheckpointError(f"{at}: shared tensors or expert 0 differ from the public model (fingerprint "
                                  f"{fp[:12]}... vs {public_fingerprint[:12]}...); it was not branched from this public model")
        tensors: dict[str, Any] = {}
        for i in range(cfg.num_layers):
            for name in EXPERT_WEIGHTS:
                tensors[package_weight_key(i, name)] = native[experts_key(i, name)][1]
            tensors[package_router_key(i)] = native[router_weight_key(i)][1]
        if "domain_centroids" in native:  # carried by our export-hf
            tensors["domain_embedding"] = pool.read(native["domain_centroids"][1]).float()
        else:  # another stack's checkpoint: branch takes the centroids from the layer-0 router rows, so do the same
            tensors["domain_embedding"] = pool.read(tensors[package_router_key(0)]).float()
        if "domain_ngrams" in native:  # the owner's n-gram profile, carried by our export-hf
            tensors["domain_ngram"] = pool.read(native["domain_ngrams"][1]).float()
    # Unnamed checkpoints take the directory's name, so two of them in one merge stay distinct.
    owner = named[1] if named else {"owner": hf_dir.name, "domain": hf_dir.name}
    manifest = {
        "format": FORMAT, "owner": owner["owner"], "domain": owner["domain"],
        "licence": owner.get("licence", "unspecified"), "base_fingerprint": fp,
        "tokens_seen": owner.get("tokens_seen"), "dp": owner.get("dp"),
        # An export-hf of a flexmoe model carries the owner's consent (schema-checked, its slot's hash verified).
        "consent": owner.get("consent"),
        "shape": {"num_layers": cfg.num_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff},
        "router_bias": False, "files": {}, "source_format": "hf", "architecture": ck.architecture,
    }
    return manifest, tensors


def read_hf_public(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, LazyTensor], dict[str, Any]]:
    """A dense Olmo2 directory as merge's public model: (cfg, native state dict as lazy tensors, meta with
    its fingerprint, computed streaming)."""
    ck = open_hf_dir(hf_dir)
    if ck.cfg.is_moe:
        raise CheckpointError(f"{Path(hf_dir) / HF_CONFIG}: merge takes the dense public model, found "
                              f"{ck.architecture} with num_experts={ck.cfg.num_experts}")
    sd = ck.native()
    with FilePool() as pool:
        meta: dict[str, Any] = {"kind": "public", "fingerprint": stream_fingerprint(sd, pool)}
    _, router_public = read_extras(Path(hf_dir), ck.cfg)
    if router_public is not None:  # merge reads row 0 from here, relative to the directory
        meta["router_embedding"] = {"router_public": str(router_public.relative_to(hf_dir))}
    return ck.cfg, sd, meta


def _first_difference(native: dict[str, LazyTensor], public_sd: dict[str, Any], pool: FilePool) -> Path | None:
    """The file holding the first anchor tensor that differs from the public model's."""
    from flexmoe.io.fingerprint import anchor_view

    for k, t in sorted(anchor_view(native).items()):
        ref = public_sd.get(k)
        if ref is None or ref.dtype != t.dtype or tuple(ref.shape) != t.shape:
            return t.path
        if not torch.equal(pool.read(t), pool.read(ref) if isinstance(ref, LazyTensor) else ref):
            return t.path
    return None
