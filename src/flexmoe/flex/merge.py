"""Merge: the public model + any N expert packages -> one (N+1)-expert MoE.

Inputs may also be Hugging Face directories: 2-expert FlexOlmo checkpoints as experts and a
dense Olmo2 as the public model (see flex/hf_inputs.py). For a Hugging Face output, run
`flexmoe export-hf` on the merged directory.

Everything is checked before anything is written: fingerprints, shapes, duplicate domains and
every file's sha256. A refusal is one line naming the file at fault, and leaves no output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from flexmoe.config.model import ROUTINGS
from flexmoe.io.hf_dir import hf_architecture
from flexmoe.flex.hf_inputs import read_hf_anchor, read_hf_public
from flexmoe.io.model_dir import CheckpointError, load_model_dir, save_model_dir
from flexmoe.flex.consent import PUBLIC_CONSENT, add_tensor_hashes
from flexmoe.io.fingerprint import fingerprint
from flexmoe.flex.package import read_package
from flexmoe.io.keys import (EXPERT_WEIGHTS, dense_ffn_key, experts_key, is_shared_key, package_bias_key, package_layer_of,
                             package_router_key, package_weight_key, router_bias_key, router_weight_key)
from flexmoe.io.log import get_logger

log = get_logger(__name__)


def merge(public_dir: str | Path, packages: list[str | Path], out_dir: str | Path, *, top_k: int | None = None,
          norm_topk_prob: bool = False, routing: str = "auto", shared: str = "public",
          router_rows: str = "raw", router_cosine_temp: float = 0.0, overwrite: bool = False) -> Path:
    """Write the merged model; expert slot 0 is the public FFN, slot j the j-th package.

    `shared`: `public` keeps the public model's shared tensors (FlexOlmo); `average` takes the mean
    over the packages' copies (BAR), a package without trained shared tensors counting the public
    copy. Either way the relative L2 divergence of every shipped shared tensor is recorded.
    `routing`: a policy of ModelConfig.routing, or `auto`: anchor_ngram when the public model and
    every package carry n-gram profiles (the measured best, README "Routing quality"), else topk.
    `router_cosine_temp` > 0: the router scores rows by cosine similarity over that temperature.
    """
    if routing != "auto" and routing not in ROUTINGS:
        raise CheckpointError(f"routing={routing!r} is not auto|{'|'.join(ROUTINGS)}")
    if router_cosine_temp < 0:
        raise CheckpointError(f"router_cosine_temp={router_cosine_temp} must be >= 0 (0: dot-product routing)")
    if shared not in ("public", "average"):
        raise CheckpointError(f"shared={shared!r} is not public|average")
    if router_rows not in ROW_TRANSFORMS:
        raise CheckpointError(f"router_rows={router_rows!r} is not one of {'|'.join(ROW_TRANSFORMS)}")
    public_dir = Path(public_dir)
    # A dense Hugging Face Olmo2 directory may stand in for the native public model.
    cfg, sd, meta = read_hf_public(public_dir) if hf_architecture(public_dir) else load_model_dir(public_dir)
    if cfg.is_moe:
        raise CheckpointError(f"{public_dir}: merge takes the dense public model, found num_experts={cfg.num_experts}")
    fp = meta.get("fingerprint") or fingerprint(sd)
    if fingerprint(sd) != fp:
        raise CheckpointError(f"{public_dir}: tensors do not match the fingerprint in its flexmoe.json")
    if not packages:
        raise CheckpointError("merge needs at least one expert package")
    loaded: list[tuple[Path, dict[str, Any], dict[str, torch.Tensor]]] = []
    seen: dict[str, Path] = {}
    for pkg in map(Path, packages):
        if not (pkg / "manifest.json").exists() and hf_architecture(pkg):
            # A Hugging Face 2-expert FlexOlmo checkpoint: slot 1 is the owner's expert, once
            # slot 0 and every shared tensor are proven to be this public model's.
            manifest, tensors = read_hf_anchor(pkg, fp, public_sd=sd)
        else:
            manifest, tensors = read_package(pkg)
        if manifest["base_fingerprint"] != fp:
            raise CheckpointError(f"{pkg / 'manifest.json'}: base fingerprint {manifest['base_fingerprint'][:12]}... "
                                  f"is not the public model's {fp[:12]}...; it was trained from another model")
        if manifest["domain"] in seen:
            raise CheckpointError(f"{pkg}: domain {manifest['domain']!r} is already given by {seen[manifest['domain']]}")
        seen[manifest["domain"]] = pkg
        _check_shapes(pkg, tensors, cfg)
        loaded.append((pkg, manifest, tensors))

    num_experts = len(loaded) + 1
    k = top_k if top_k is not None else min(2, num_experts)
    if not 1 <= k <= num_experts:
        raise CheckpointError(f"top_k={k} must be between 1 and the number of experts ({num_experts})")
    use_bias = any(m.get("router_bias") for _, m, _ in loaded)
    public_file, shipped = _public_router_file(public_dir, meta)
    public_rows = _public_rows(public_dir, shipped, cfg)
    out: dict[str, torch.Tensor] = {k_: v for k_, v in sd.items() if is_shared_key(k_)}
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            out[experts_key(i, name)] = torch.stack(
                [sd[dense_ffn_key(i, name)]] + [t[package_weight_key(i, name)] for _, _, t in loaded])
        out[router_weight_key(i)] = torch.stack(
            [public_rows[i]] + [t[package_router_key(i)].float() for _, _, t in loaded])
        if use_bias:
            out[router_bias_key(i)] = torch.cat(
                [torch.zeros(1)] + [t.get(package_bias_key(i), torch.zeros(1)).float() for _, _, t in loaded])
    for i in range(cfg.num_layers):
        key = router_weight_key(i)
        out[key] = ROW_TRANSFORMS[router_rows](out[key])
    divergence = _shared_divergence(sd, loaded)
    if shared == "average":
        for k_ in divergence:
            copies = [t.get(f"shared.{k_}", sd[k_]).float() for _, _, t in loaded]
            out[k_] = torch.stack(copies).mean(0).to(sd[k_].dtype)
    elif divergence:
        log.info("packages carry trained shared tensors; keeping the public copies (shared=public)")
    # Document routing's centroids: the public row and each owner's embedding at layer 0.
    out["domain_centroids"] = torch.stack(
        [public_rows[0]] + [t.get("domain_embedding", torch.zeros(cfg.d_model)).float() for _, _, t in loaded])
    profiles = _ngram_profiles(public_file, shipped, loaded, required=routing == "anchor_ngram")
    if routing == "auto":
        routing = "anchor_ngram" if profiles is not None else "topk"
        log.info(f"merge: routing={routing}" + ("" if profiles is not None else " (not every package carries an "
              "n-gram profile for anchor_ngram)"))
    if profiles is not None:  # n-gram profiles of document routing: public data's, then each owner's
        out["domain_ngrams"] = profiles
    merged_cfg = cfg.replace(num_experts=num_experts, top_k=k, norm_topk_prob=norm_topk_prob, router_bias=use_bias,
                             routing=routing, router_cosine_temp=router_cosine_temp, doc_ngram_buckets=int(profiles.shape[-1]) if profiles is not None else 0)
    experts = [{"slot": 0, "owner": "public", "domain": "public", "licence": meta.get("licence", "unspecified"),
                "consent": meta.get("consent") or PUBLIC_CONSENT}]
    for j, (pkg, m, _) in enumerate(loaded, start=1):
        experts.append({"slot": j, "owner": m["owner"], "domain": m["domain"], "licence": m.get("licence"),
                        "package_sha256": m["files"].get("expert.safetensors"), "tokens_seen": m.get("tokens_seen"),
                        "dp": m.get("dp"), "consent": m.get("consent"), "source": str(pkg)})
    # Binds each consent record to its slot's tensors: flex.consent checks it on load.
    experts = add_tensor_hashes(experts, out, cfg.num_layers)
    new_meta = {"kind": "merged", "base_fingerprint": fp, "tokenizer": meta.get("tokenizer"), "experts": experts,
                "shared": shared, "shared_divergence": divergence}
    path = save_model_dir(out_dir, merged_cfg, out, new_meta, overwrite=overwrite)
    log.info(f"merged {len(loaded)} packages into {path} ({num_experts} experts, top_k={k})")
    return path


def _check_shapes(pkg: Path, tensors: dict[str, torch.Tensor], cfg) -> None:
    want = {"gate_proj": (cfg.d_ff, cfg.d_model), "up_proj": (cfg.d_ff, cfg.d_model),
            "down_proj": (cfg.d_model, cfg.d_ff)}
    for i in range(cfg.num_layers):
        for key, shape in [(package_weight_key(i, n), s) for n, s in want.items()] + [(package_router_key(i), (cfg.d_model,))]:
            t = tensors.get(key)
            if t is None:
                raise CheckpointError(f"{pkg / 'expert.safetensors'}: missing tensor {key}")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"{pkg / 'expert.safetensors'}: {key} has shape {tuple(t.shape)}, "
                                      f"the public model needs {shape}")
    emb = tensors.get("domain_embedding")
    if emb is not None and tuple(emb.shape) != (cfg.d_model,):
        raise CheckpointError(f"{pkg / 'expert.safetensors'}: domain_embedding has shape {tuple(emb.shape)}, "
                              f"the public model needs ({cfg.d_model},)")
    extra = [k for k in tensors if (package_layer_of(k) or 0) >= cfg.num_layers]
    if extra:
        raise CheckpointError(f"{pkg / 'expert.safetensors'}: has tensors for layers the public model lacks ({extra[0]})")


def _public_router_file(public_dir: Path, meta: dict[str, Any]) -> tuple[Path, dict[str, torch.Tensor]]:
    """The public model's shipped router file and its tensors (router rows, n-gram profile); read once."""
    from safetensors.torch import load_file

    name = (meta.get("router_embedding") or {}).get("router_public")
    return (public_dir / name, load_file(str(public_dir / name))) if name else (public_dir, {})


def _public_rows(public_dir: Path, shipped: dict[str, torch.Tensor], cfg) -> torch.Tensor:
    if "router_embedding" not in shipped:
        log.warning(f"{public_dir} ships no public router row; using zeros")
        return torch.zeros(cfg.num_layers, cfg.d_model)
    return shipped["router_embedding"].float()


def _ngram_profiles(public_file: Path, shipped: dict[str, torch.Tensor], loaded, *,
                    required: bool) -> torch.Tensor | None:
    """`[N+1, buckets]` n-gram profiles when the public model and every package carry one; None
    otherwise, or an error naming what lacks one when the routing needs them."""
    rows = [(public_file, shipped.get("domain_ngram"))] + [(pkg / "expert.safetensors", t.get("domain_ngram"))
                                                           for pkg, _, t in loaded]
    missing = [str(w) for w, r in rows if r is None]
    if missing:
        if required:
            raise CheckpointError(f"{missing[0]}: has no n-gram profile, which routing=anchor_ngram needs; re-run "
                                  "`flexmoe router-embed` (the public one with --public) and branch again")
        return None
    want = (rows[0][1].shape[-1],)
    for where, r in rows:
        if tuple(r.shape) != want:
            raise CheckpointError(f"{where}: n-gram profile of shape {tuple(r.shape)} does not match the public "
                                  f"model's {want}; make every profile with one --ngram-buckets")
    return torch.stack([r.float() for _, r in rows])


def _common_norm(rows_ED: torch.Tensor) -> torch.Tensor:
    """Every row scaled to the rows' mean norm: no owner wins tokens by a larger row alone."""
    norms = rows_ED.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return rows_ED / norms * norms.mean()


def _centred_norm(rows_ED: torch.Tensor) -> torch.Tensor:
    """Each owner's offset from the public row scaled to a common norm. (Centring alone changes
    nothing: every logit shifts by the same h . r_0, and the softmax ignores a shared shift.)"""
    off = rows_ED[1:] - rows_ED[:1]
    if off.shape[0] == 0:
        return rows_ED
    n = off.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([rows_ED[:1], rows_ED[:1] + off / n * n.mean()])


ROW_TRANSFORMS = {"raw": lambda r: r, "common_norm": _common_norm, "centred_norm": _centred_norm}


def _shared_divergence(public_sd: dict[str, torch.Tensor], loaded) -> dict[str, dict[str, float]]:
    """{shared tensor: {owner: ||w_owner - w_public|| / ||w_public||}} for tensors packages ship."""
    out: dict[str, dict[str, float]] = {}
    for pkg, manifest, tensors in loaded:
        for key, t in tensors.items():
            if not key.startswith("shared."):
                continue
            name = key[len("shared."):]
            ref = public_sd.get(name)
            if ref is None or ref.shape != t.shape:
                raise CheckpointError(f"{pkg / 'expert.safetensors'}: shared tensor {name} does not fit the public model")
            rel = float((t.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))
            out.setdefault(name, {})[manifest["owner"]] = rel
    return out
