"""Expert package: the owner's trained expert FFN per layer, its router rows and bias, as
safetensors plus a JSON manifest. It carries no data and nothing shared."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmoe.convert.safetensors_io import CheckpointError, atomic_dir, load_model_dir, sha256_file, write_json
from flexmoe.flex.fingerprint import fingerprint

FORMAT = "flexmoe-expert-package/1"
TENSORS = "expert.safetensors"
MANIFEST = "manifest.json"


def make_package(trained_dir: str | Path, out_dir: str | Path, *, owner: str, domain: str,
                 licence: str = "unspecified", dp: dict[str, Any] | None = None,
                 overwrite: bool = False) -> Path:
    """Cut the owner's expert (slot 1) out of a trained 2-expert anchor model."""
    trained_dir = Path(trained_dir)
    cfg, sd, meta = load_model_dir(trained_dir)
    if cfg.num_experts != 2:
        raise CheckpointError(f"{trained_dir}: expected a 2-expert anchor model, found num_experts={cfg.num_experts}")
    base_fp = meta.get("base_fingerprint")
    if not base_fp:
        raise CheckpointError(f"{trained_dir / 'flexmoe.json'}: no base_fingerprint; was it made by `flexmoe branch`?")
    if fingerprint(sd) != base_fp:
        raise CheckpointError(f"{trained_dir}: shared tensors or the anchor differ from the public model "
                              "(fingerprint mismatch); only anchor-frozen training can be packaged")
    tensors: dict[str, torch.Tensor] = {}
    for i in range(cfg.num_layers):
        for name in ("gate_proj", "up_proj", "down_proj"):
            tensors[f"layers.{i}.{name}"] = sd[f"layers.{i}.ffn.experts.{name}"][1].contiguous()
        tensors[f"layers.{i}.router"] = sd[f"layers.{i}.ffn.router.weight"][1].contiguous()
        bias = sd.get(f"layers.{i}.ffn.router.bias")
        if bias is not None:
            tensors[f"layers.{i}.bias"] = bias[1:2].clamp(max=0).contiguous()
    if "domain_centroids" in sd:  # the owner's layer-0 embedding, for document routing
        tensors["domain_embedding"] = sd["domain_centroids"][1].float().contiguous()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        manifest = {
            "format": FORMAT, "owner": owner, "domain": domain, "licence": licence,
            "base_fingerprint": base_fp, "tokens_seen": int(meta.get("tokens_seen", 0)),
            "dp": dp if dp is not None else meta.get("dp"),
            "shape": {"num_layers": cfg.num_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff},
            "router_bias": cfg.router_bias,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {TENSORS: sha256_file(tmp / TENSORS)},
        }
        write_json(tmp / MANIFEST, manifest)
    return Path(out_dir)


def read_package(pkg_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a package, with every file's sha256 checked first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from flexmoe.convert.safetensors_io import read_json

    pkg_dir = Path(pkg_dir)
    manifest = read_json(pkg_dir / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{pkg_dir / MANIFEST}: format {manifest.get('format')!r} is not {FORMAT}")
    for key in ("owner", "domain", "base_fingerprint", "shape", "files"):
        if key not in manifest:
            raise CheckpointError(f"{pkg_dir / MANIFEST}: missing field {key!r}")
    for name, digest in manifest["files"].items():
        f = pkg_dir / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: sha256 does not match {pkg_dir / MANIFEST}; the file is corrupted")
    try:
        tensors = load_file(str(pkg_dir / TENSORS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{pkg_dir / TENSORS}: cannot read safetensors ({e})") from e
    return manifest, tensors
