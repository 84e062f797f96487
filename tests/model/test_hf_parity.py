"""Our decoder computes what transformers' Olmo2 / FlexOlmo compute, weights copied both ways."""

import pytest
import torch

from flexmoe.config import ModelConfig
from flexmoe.convert.hf import fuse_experts, hf_config, hf_to_native, native_to_hf
from flexmoe.model import Transformer

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "dense": ModelConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4, d_ff=128),
    "dense_gqa": ModelConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=96),
    "moe": ModelConfig(vocab_size=97, d_model=64, num_layers=2, num_heads=4, d_ff=96, num_experts=4, top_k=2),
    "moe_gqa_norm": ModelConfig(vocab_size=97, d_model=64, num_layers=3, num_heads=4, num_kv_heads=1, d_ff=80,
                                num_experts=3, top_k=2, norm_topk_prob=True),
}


def _hf_model(cfg):
    hc = hf_config(cfg)
    cls = transformers.FlexOlmoConfig if cfg.is_moe else transformers.Olmo2Config
    kw = {k: v for k, v in hc.items() if k not in ("architectures", "model_type", "torch_dtype")}
    model_cls = transformers.FlexOlmoForCausalLM if cfg.is_moe else transformers.Olmo2ForCausalLM
    hf_cfg = cls(**kw)
    hf_cfg._attn_implementation = "eager"
    return model_cls(hf_cfg).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_hf_both_ways(name):
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    ours = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 24))

    # ours -> HF
    hf = _hf_model(cfg)
    hf_sd = native_to_hf(ours.state_dict(), cfg)
    missing, unexpected = hf.load_state_dict(fuse_experts(hf_sd, cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    # HF (fresh random weights) -> ours
    hf2 = _hf_model(cfg)
    with torch.no_grad():
        for p in hf2.parameters():
            p.normal_(0, 0.05)
    ours2 = Transformer(cfg).eval()
    ours2.load_state_dict(hf_to_native(hf2.state_dict(), cfg))
    with torch.no_grad():
        torch.testing.assert_close(ours2(tokens).logits, hf2(tokens).logits, atol=1e-5, rtol=1e-5)


def test_sdpa_matches_eager():
    cfg = CONFIGS["moe_gqa_norm"]
    torch.manual_seed(1)
    a = Transformer(cfg).eval()
    b = Transformer(cfg.replace(attn_impl="eager")).eval()
    b.load_state_dict(a.state_dict())
    t = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(a(t).logits, b(t).logits, atol=1e-5, rtol=1e-5)
