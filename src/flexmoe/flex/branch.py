"""Branch: dense public model -> 2-expert anchor MoE (expert 0 = public FFN, frozen; expert 1 = copy)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from flexmoe.config.model import ModelConfig
from flexmoe.io.model_dir import CheckpointError, load_model_dir, save_model_dir
from flexmoe.io.fingerprint import fingerprint
from flexmoe.io.keys import EXPERT_WEIGHTS, dense_ffn_key, experts_key, is_shared_key, router_bias_key, router_weight_key


def branch_state_dict(
    cfg: ModelConfig, sd: dict[str, torch.Tensor], router_rows: torch.Tensor | None = None,
    ngram_profiles: torch.Tensor | None = None,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Dense state dict -> 2-expert state dict.

    `router_rows` `[L, 2, D]` (public row, owner row) initialise the routers; without them the
    router is zero, i.e. both experts weigh 1/2, and the branched model computes the dense one.
    `ngram_profiles` `[2, buckets]` (public, owner): document-routing profiles carried along to
    the package (model/docroute.py); training never reads them.
    """
    if cfg.is_moe:
        raise CheckpointError("branch needs a dense public model (model.num_experts=0)")
    buckets = int(ngram_profiles.shape[-1]) if ngram_profiles is not None else 0
    moe_cfg = cfg.replace(num_experts=2, top_k=2, doc_ngram_buckets=buckets)
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if is_shared_key(k):
            out[k] = v.clone()
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            w = sd[dense_ffn_key(i, name)]
            out[experts_key(i, name)] = torch.stack([w, w.clone()])
        if router_rows is not None:
            out[router_weight_key(i)] = router_rows[i].float().clone()
        else:
            out[router_weight_key(i)] = torch.zeros(2, cfg.d_model)
        if moe_cfg.router_bias:
            out[router_bias_key(i)] = torch.zeros(2)
    # Layer-0 rows double as the domain centroids of document routing (public, owner).
    out["domain_centroids"] = router_rows[0].float().clone() if router_rows is not None else torch.zeros(2, cfg.d_model)
    if ngram_profiles is not None:
        out["domain_ngrams"] = ngram_profiles.float().clone()
    return moe_cfg, out


def branch(public_dir: str | Path, out_dir: str | Path, owner_rows: torch.Tensor | None = None,
           public_rows: torch.Tensor | None = None, *, router_bias: bool = False, overwrite: bool = False,
           owner_ngram: torch.Tensor | None = None, public_ngram: torch.Tensor | None = None) -> Path:
    """Write the owner's 2-expert anchor model from the public model directory.

    `owner_rows`/`public_rows` `[L, D]`: router embeddings (see `flexmoe router-embed`); the public
    rows default to the ones shipped with the public model. `owner_ngram`/`public_ngram`
    `[buckets]`: n-gram profiles from the same files, carried for routing=anchor_ngram.
    """
    cfg, sd, meta = load_model_dir(public_dir)
    public_file = (meta.get("router_embedding") or {}).get("router_public")
    shipped = load_file(str(Path(public_dir) / public_file)) if public_file else {}  # read once: rows + profile
    if public_rows is None:
        public_rows = shipped.get("router_embedding")
    if public_ngram is None:
        public_ngram = shipped.get("domain_ngram")
    profiles = None
    if owner_ngram is not None:
        if public_ngram is None:
            raise CheckpointError(f"{public_dir}: its public router embedding has no n-gram profile; re-run "
                                  "`flexmoe router-embed --public` to make one")
        if public_ngram.shape != owner_ngram.shape:
            raise CheckpointError(f"{public_dir}: public n-gram profile has {public_ngram.shape[-1]} buckets, the "
                                  f"owner's {owner_ngram.shape[-1]}; make both with the same --ngram-buckets")
        profiles = torch.stack([public_ngram, owner_ngram])
    rows = None
    if owner_rows is not None:
        if public_rows is None:
            raise CheckpointError(f"{public_dir}: has no public router embedding; run `flexmoe router-embed --public` first")
        rows = torch.stack([public_rows, owner_rows], dim=1)
    cfg = cfg.replace(router_bias=router_bias)
    moe_cfg, out = branch_state_dict(cfg, sd, rows, profiles)
    fp = meta.get("fingerprint") or fingerprint(sd)
    new_meta = {"kind": "anchor", "base_fingerprint": fp, "tokenizer": meta.get("tokenizer"),
                "experts": [{"slot": 0, "owner": "public", "domain": "public"}]}
    return save_model_dir(out_dir, moe_cfg, out, new_meta, overwrite=overwrite)

