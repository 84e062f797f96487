"""Small builders shared by tests: a public model directory and expert packages, no training."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from flexmoe.config import ModelConfig
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.flex.branch import branch
from flexmoe.io.fingerprint import fingerprint
from flexmoe.flex.package import make_package
from flexmoe.flex.router_init import attach_public_embedding
from flexmoe.model import Transformer

TINY = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)


NGRAM_BUCKETS = 64  # tiny n-gram profiles for document-routing tests


def random_profile(seed: int, buckets: int = NGRAM_BUCKETS) -> torch.Tensor:
    """A valid n-gram profile (log-frequencies summing to 1) with random values."""
    return torch.randn(buckets, generator=torch.Generator().manual_seed(seed)).log_softmax(0)


def make_public(root: Path, cfg: ModelConfig = TINY, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.reset_parameters(seed=seed)
    sd = model.state_dict()
    out = save_model_dir(root / "public", cfg, sd, {"kind": "public", "fingerprint": fingerprint(sd)})
    rows = torch.randn(cfg.num_layers, cfg.d_model, generator=torch.Generator().manual_seed(seed + 99))
    save_file({"router_embedding": rows, "domain_ngram": random_profile(seed + 98)},
              str(root / "public_rows.safetensors"))
    attach_public_embedding(out, root / "public_rows.safetensors")
    return out


def make_trained_anchor(root: Path, public: Path, domain: str, seed: int, ngram: bool = False) -> Path:
    """A branched model whose expert 1 and router row 1 moved, as training would move them;
    with `ngram`, carrying a random n-gram profile for the owner."""
    g = torch.Generator().manual_seed(seed)
    cfg, _, _ = load_model_dir(public)
    owner_rows = torch.randn(cfg.num_layers, cfg.d_model, generator=g)
    anchor = branch(public, root / f"anchor-{domain}", owner_rows,
                    owner_ngram=random_profile(seed + 7) if ngram else None)
    mcfg, sd, meta = load_model_dir(anchor)
    for k, v in sd.items():
        if ".ffn.experts." in k:
            v[1] += 0.05 * torch.randn(v[1].shape, generator=g)
    return save_model_dir(root / f"trained-{domain}", mcfg, sd, dict(meta, tokens_seen=1000), overwrite=True)


def make_packages(root: Path, public: Path, domains: list[str], ngram: bool = False) -> list[Path]:
    pkgs = []
    for i, d in enumerate(domains):
        trained = make_trained_anchor(root, public, d, seed=100 + i, ngram=ngram)
        pkgs.append(make_package(trained, root / f"pkg-{d}", owner=f"owner-{d}", domain=d, licence="research"))
    return pkgs
