"""Builders for the conversion tests: random tiny native models and HF checkpoints saved by transformers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open

from flexmoe.config import ModelConfig
from flexmoe.convert.hf import hf_config
from flexmoe.io.model_dir import save_model_dir
from flexmoe.io.fingerprint import fingerprint
from flexmoe.model import Transformer


def random_config(seed: int, moe: bool, gqa: bool) -> ModelConfig:
    """A small config with shapes drawn from `seed` (heads, widths, layers, experts, top-k)."""
    r = random.Random(seed)
    heads = r.choice([2, 4])
    kv = r.choice([k for k in (1, 2) if k < heads and heads % k == 0]) if gqa else None
    experts = r.randint(2, 4) if moe else 0
    return ModelConfig(vocab_size=r.randint(40, 90), d_model=r.choice([16, 32]) * heads // 2, num_layers=r.randint(1, 3),
                       num_heads=heads, num_kv_heads=kv, d_ff=r.choice([24, 40, 56]), num_experts=experts,
                       top_k=r.randint(1, experts) if moe else 2, norm_topk_prob=moe and r.random() < 0.5)


@torch.no_grad()
def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Weights far from init (norms and routers included), so a mixed-up tensor changes the logits."""
    torch.manual_seed(seed)
    model = Transformer(cfg)
    for name, p in model.named_parameters():
        p.copy_(1 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else 0.1 * torch.randn(p.shape))
    sd = model.state_dict()
    for buf in ("domain_centroids", "domain_ngrams"):  # buffers, not parameters, but model state all the same
        if buf in sd:
            sd[buf] = torch.randn(sd[buf].shape)
    return sd


def make_native(root: Path, cfg: ModelConfig, seed: int = 0, name: str = "native") -> Path:
    sd = random_state_dict(cfg, seed)
    kind = {"kind": "merged", "base_fingerprint": fingerprint(sd),
            "experts": [{"slot": j, "owner": f"o{j}", "domain": f"d{j}"} for j in range(cfg.num_experts)]} \
        if cfg.is_moe else {"kind": "public", "fingerprint": fingerprint(sd)}
    return save_model_dir(root / name, cfg, sd, kind)


def hf_model(cfg: ModelConfig, seed: int = 0, **overrides):
    """A transformers Olmo2 / FlexOlmo model with random weights (std 0.1, norms near 1)."""
    import transformers

    hc = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hc.update(overrides)
    cls, model_cls = ((transformers.FlexOlmoConfig, transformers.FlexOlmoForCausalLM) if cfg.is_moe
                      else (transformers.Olmo2Config, transformers.Olmo2ForCausalLM))
    torch.manual_seed(seed)
    model = model_cls(cls(**hc)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape) if "norm" in name else 0.1 * torch.randn(p.shape))
    return model


def save_hf(model, path: Path, shard: str = "30KB", dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    return path


def hf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of every tensor in a directory's safetensors files (read by the
    safetensors library, not by the code under test)."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                assert k not in out, f"{k} stored twice"
                out[k] = (str(t.dtype), tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def edit_json(path: Path, fn) -> None:
    obj = json.loads(path.read_text())
    fn(obj)
    path.write_text(json.dumps(obj))


def refuse(capsys, argv: list[str], dst: Path) -> str:
    """Run the CLI expecting a refusal: exit 2, one stderr line, nothing at `dst` nor a temp dir beside it."""
    from flexmoe.cli import main as cli_main

    capsys.readouterr()  # drop what setup printed
    rc = cli_main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"flexmoe {argv[0]}: error: "), err
    assert not dst.exists()
    assert not list(dst.parent.glob(f".{dst.name}.tmp-*"))
    return err
