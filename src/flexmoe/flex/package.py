"""Expert package: the owner's trained expert FFN per layer, its router rows and bias, as
safetensors plus a JSON manifest. It carries no data and nothing shared."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from flexmoe.config.model import NATIVE_BUFFERS
from flexmoe.io.model_dir import CheckpointError, atomic_dir, load_model_dir, write_json
from flexmoe.io.files import sha256_file
from flexmoe.flex.consent import make_consent
from flexmoe.io.fingerprint import fingerprint
from flexmoe.io.keys import (EXPERT_WEIGHTS, experts_key, is_shared_key, package_bias_key, package_router_key, package_weight_key,
                             router_bias_key, router_weight_key)

FORMAT = "flexmoe-expert-package/1"
SHARED_TRAINING_STAGES = ("sft", "rl_unfrozen")
TENSORS = "expert.safetensors"
MANIFEST = "manifest.json"


def make_package(trained_dir: str | Path, out_dir: str | Path, *, owner: str, domain: str,
                 licence: str = "unspecified", dp: dict[str, Any] | None = None,
                 include_shared: bool | None = None, allowed_uses: list[str] | None = None,
                 expires: str | None = None, overwrite: bool = False) -> Path:
    """Cut the owner's expert (slot 1) out of a trained 2-expert anchor model.

    `allowed_uses` (see flex.consent.USES) and `expires` (YYYY-MM-DD, last valid day) form the
    manifest's `consent` record, which merge carries into the merged model; without uses, no
    `use=` request will activate this expert.

    Stages that unfreeze shared parameters (BAR's `sft`, `rl_unfrozen`) also ship those tensors
    (`shared.<name>`), for `flexmoe merge --shared average`; `include_shared` defaults to that.
    """
    trained_dir = Path(trained_dir)
    consent = make_consent(allowed_uses, expires, where="package --allowed-uses/--expires")
    cfg, sd, meta = load_model_dir(trained_dir)
    if cfg.num_experts != 2:
        raise CheckpointError(f"{trained_dir}: expected a 2-expert anchor model, found num_experts={cfg.num_experts}")
    base_fp = meta.get("base_fingerprint")
    if not base_fp:
        raise CheckpointError(f"{trained_dir / 'flexmoe.json'}: no base_fingerprint; was it made by `flexmoe branch`?")
    stage = meta.get("stage")
    if include_shared is None:
        include_shared = stage in SHARED_TRAINING_STAGES
    if not include_shared and fingerprint(sd) != base_fp:
        raise CheckpointError(f"{trained_dir}: shared tensors or the anchor differ from the public model "
                              "(fingerprint mismatch); only anchor-frozen training can be packaged "
                              "(BAR stages sft/rl_unfrozen ship their shared tensors)")
    tensors: dict[str, torch.Tensor] = {}
    if include_shared:
        for k, v in sd.items():
            if is_shared_key(k) and k not in NATIVE_BUFFERS:
                tensors[f"shared.{k}"] = v.contiguous()
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            tensors[package_weight_key(i, name)] = sd[experts_key(i, name)][1].contiguous()
        tensors[package_router_key(i)] = sd[router_weight_key(i)][1].contiguous()
        bias = sd.get(router_bias_key(i))
        if bias is not None:
            tensors[package_bias_key(i)] = bias[1:2].clamp(max=0).contiguous()
    if "domain_centroids" in sd:  # the owner's layer-0 embedding, for document routing
        tensors["domain_embedding"] = sd["domain_centroids"][1].float().contiguous()
    if "domain_ngrams" in sd:  # the owner's n-gram profile, for routing=anchor_ngram
        tensors["domain_ngram"] = sd["domain_ngrams"][1].float().contiguous()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / TENSORS))
        manifest = {
            "format": FORMAT, "owner": owner, "domain": domain, "licence": licence,
            "base_fingerprint": base_fp, "tokens_seen": int(meta.get("tokens_seen", 0)),
            "dp": check_dp_record(dp if dp is not None else meta.get("dp"), trained_dir), "consent": consent,
            "shape": {"num_layers": cfg.num_layers, "d_model": cfg.d_model, "d_ff": cfg.d_ff},
            "router_bias": cfg.router_bias, "stage": stage,
            "shared": sorted(k[len("shared."):] for k in tensors if k.startswith("shared.")),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {TENSORS: sha256_file(tmp / TENSORS)},
        }
        write_json(tmp / MANIFEST, manifest)
    return Path(out_dir)


def read_package(pkg_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Manifest and tensors of a package, with every file's sha256 checked first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from flexmoe.io.model_dir import read_json

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


DP_FIELDS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sampling_rate", "steps")


def check_dp_record(dp: dict[str, Any] | None, where: Path) -> dict[str, Any] | None:
    """A DP claim in a manifest must state its whole guarantee (see train/privacy.py), or be absent."""
    if dp is None:
        return None
    missing = [f for f in DP_FIELDS if not isinstance(dp.get(f), (int, float))]
    if missing:
        raise CheckpointError(f"{where}: dp record lacks numeric {missing}; train with privacy.enabled=true or drop the dp claim")
    return dp
