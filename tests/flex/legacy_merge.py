"""Today's in-memory merge (flex/merge.py before issue 16 made it stream), kept to compare against.

Copied from the state-dict-building part of `flexmoe.flex.merge.merge` as it was: the public model
and every package loaded whole, stacked with torch, router rows transformed, shared tensors
averaged with `torch.stack(copies).mean(0)`. It returns (merged config, state dict) without
writing anything; the streaming merge must produce exactly these tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from flexmoe.io.keys import (EXPERT_WEIGHTS, dense_ffn_key, experts_key, is_shared_key, package_bias_key,
                             package_router_key, package_weight_key, router_bias_key, router_weight_key)
from flexmoe.io.model_dir import load_model_dir


def _common_norm(rows_ED):
    norms = rows_ED.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return rows_ED / norms * norms.mean()


def _centred_norm(rows_ED):
    off = rows_ED[1:] - rows_ED[:1]
    if off.shape[0] == 0:
        return rows_ED
    n = off.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return torch.cat([rows_ED[:1], rows_ED[:1] + off / n * n.mean()])


ROW_TRANSFORMS = {"raw": lambda r: r, "common_norm": _common_norm, "centred_norm": _centred_norm}


def legacy_merge(public_dir, packages, *, top_k=None, norm_topk_prob=False, routing="topk", shared="public",
                 router_rows="raw", router_cosine_temp=0.0):
    public_dir = Path(public_dir)
    cfg, sd, meta = load_model_dir(public_dir)
    loaded = [(Path(p), load_file(str(Path(p) / "expert.safetensors"))) for p in packages]
    num_experts = len(loaded) + 1
    k = top_k if top_k is not None else min(2, num_experts)
    use_bias = any(json.loads((p / "manifest.json").read_text()).get("router_bias") for p, _ in loaded)
    name = (meta.get("router_embedding") or {}).get("router_public")
    shipped = load_file(str(public_dir / name)) if name else {}
    public_rows = shipped["router_embedding"].float() if "router_embedding" in shipped else \
        torch.zeros(cfg.num_layers, cfg.d_model)
    out = {k_: v for k_, v in sd.items() if is_shared_key(k_)}
    for i in range(cfg.num_layers):
        for n in EXPERT_WEIGHTS:
            out[experts_key(i, n)] = torch.stack([sd[dense_ffn_key(i, n)]] + [t[package_weight_key(i, n)] for _, t in loaded])
        out[router_weight_key(i)] = torch.stack([public_rows[i]] + [t[package_router_key(i)].float() for _, t in loaded])
        if use_bias:
            out[router_bias_key(i)] = torch.cat(
                [torch.zeros(1)] + [t.get(package_bias_key(i), torch.zeros(1)).float() for _, t in loaded])
    for i in range(cfg.num_layers):
        out[router_weight_key(i)] = ROW_TRANSFORMS[router_rows](out[router_weight_key(i)])
    shipped_shared = sorted({key[len("shared."):] for _, t in loaded for key in t if key.startswith("shared.")})
    if shared == "average":
        for k_ in shipped_shared:
            copies = [t.get(f"shared.{k_}", sd[k_]).float() for _, t in loaded]
            out[k_] = torch.stack(copies).mean(0).to(sd[k_].dtype)
    out["domain_centroids"] = torch.stack(
        [public_rows[0]] + [t.get("domain_embedding", torch.zeros(cfg.d_model)).float() for _, t in loaded])
    rows = [shipped.get("domain_ngram")] + [t.get("domain_ngram") for _, t in loaded]
    profiles = torch.stack([r.float() for r in rows]) if all(r is not None for r in rows) else None
    if profiles is not None:
        out["domain_ngrams"] = profiles
    merged_cfg = cfg.replace(num_experts=num_experts, top_k=k, norm_topk_prob=norm_topk_prob, router_bias=use_bias,
                             routing=routing, router_cosine_temp=router_cosine_temp,
                             doc_ngram_buckets=int(profiles.shape[-1]) if profiles is not None else 0)
    return merged_cfg, out
