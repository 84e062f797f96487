"""Branch: dense public model -> 2-expert anchor MoE (expert 0 = public FFN, frozen; expert 1 = copy).

`branch` streams: every output tensor is byte spans of the public model (each dense FFN twice),
router rows and routing buffers are computed in memory, and the weights are written shard by
shard in the public file's order, so one read both copies the public model and verifies its
sha256 (a mismatch discards the output before it is renamed into place).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from flexmoe.config.model import ModelConfig
from flexmoe.io.model_dir import CheckpointError, atomic_dir
from flexmoe.io.native import open_native, parse_size, write_native
from flexmoe.io.progress import Progress
from flexmoe.io.stream import FilePool, LazyTensor, stream_fingerprint
from flexmoe.io.writer import nbytes, stacked
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
    lazy = isinstance(sd, _Lazy)
    for k, v in sd.items():
        if is_shared_key(k):
            out[k] = v if lazy else v.clone()
    for i in range(cfg.num_layers):
        for name in EXPERT_WEIGHTS:
            w = sd[dense_ffn_key(i, name)]
            out[experts_key(i, name)] = stacked([w, w]) if lazy else torch.stack([w, w.clone()])
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
           owner_ngram: torch.Tensor | None = None, public_ngram: torch.Tensor | None = None,
           max_shard_size: int | str | None = None, owner_profile_dp: dict | None = None) -> Path:
    """Write the owner's 2-expert anchor model from the public model directory.

    `owner_rows`/`public_rows` `[L, D]`: router embeddings (see `flexmoe router-embed`); the public
    rows default to the ones shipped with the public model. `owner_ngram`/`public_ngram`
    `[buckets]`: n-gram profiles from the same files, carried for routing=anchor_ngram.
    `max_shard_size` (bytes or '5GB'): shards with an index instead of one model.safetensors.
    `owner_profile_dp`: the DP budget of `owner_ngram` (`router-embed --dp-epsilon`), recorded in
    flexmoe.json as `router_embedding.profile_dp`, which training and package carry on.
    """
    limit = parse_size(max_shard_size)
    with FilePool() as pool:
        cfg, sd, meta = open_native(public_dir, defer=pool)
        return _branch(Path(public_dir), Path(out_dir), cfg, sd, meta, pool, owner_rows, public_rows,
                       router_bias=router_bias, overwrite=overwrite, owner_ngram=owner_ngram,
                       public_ngram=public_ngram, limit=limit, owner_profile_dp=owner_profile_dp)


def _branch(public_dir: Path, out_dir: Path, cfg, sd, meta, pool, owner_rows, public_rows, *, router_bias, overwrite,
            owner_ngram, public_ngram, limit, owner_profile_dp=None) -> Path:
    if cfg.is_moe:
        raise CheckpointError("branch needs a dense public model (model.num_experts=0)")
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
    moe_cfg, out = branch_state_dict(cfg, _Lazy(sd), rows, profiles)
    fp = meta.get("fingerprint") or stream_fingerprint(sd, pool)
    new_meta = {"kind": "anchor", "base_fingerprint": fp, "tokenizer": meta.get("tokenizer"),
                "experts": [{"slot": 0, "owner": "public", "domain": "public"}]}
    if owner_profile_dp is not None:
        if owner_ngram is None:
            raise CheckpointError("owner_profile_dp is the budget of an owner n-gram profile, and none is given")
        new_meta["router_embedding"] = {"profile_dp": owner_profile_dp}
    # In the public file's order: the pass reads it front to back, hashing it as it copies.
    first = {k: (0, "") if not isinstance(t, LazyTensor) else (1, str(t.spans[0].path), t.spans[0].start)
             for k, t in ((k, t.parts[0] if hasattr(t, "parts") else t) for k, t in out.items())}
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        progress = Progress(f"branch {public_dir.name}", sum(nbytes(t) for t in out.values()))
        write_native(tmp, moe_cfg, out, new_meta, pool, progress, max_shard_size=limit,
                     order=sorted(out, key=lambda k: (first[k], k)))
        progress.finish(None)  # closes the bar; branch says nothing more when it succeeds (it prints the path)
    return out_dir


class _Lazy(dict):
    """The public state dict for `branch_state_dict`: lazy tensors pass through, FFN slots stack lazily."""

