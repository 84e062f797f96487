"""BAR-style merges: packages that trained shared tensors, merged by averaging or keeping public."""

import torch

from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from helpers import make_packages, make_public


def _sft_package(root, public, domain, shift):
    anchor = branch(public, root / f"a-{domain}")
    cfg, sd, meta = load_model_dir(anchor)
    sd["embed.weight"] = sd["embed.weight"] + shift  # as if SFT unfroze the embeddings
    sd["layers.0.ffn.experts.up_proj"][1] += 0.01
    trained = save_model_dir(root / f"t-{domain}", cfg, sd, dict(meta, stage="sft"))
    return make_package(trained, root / f"p-{domain}", owner=domain, domain=domain)


def test_average_and_public_shared(tmp_path):
    public = make_public(tmp_path)
    _, pub, _ = load_model_dir(public)
    a = _sft_package(tmp_path, public, "chat", 0.3)
    b = make_packages(tmp_path, public, ["code"])[0]  # anchor-frozen: contributes the public copy
    _, avg, meta = load_model_dir(merge(public, [a, b], tmp_path / "avg", shared="average"))
    torch.testing.assert_close(avg["embed.weight"], pub["embed.weight"] + 0.15, atol=1e-6, rtol=0)
    assert torch.equal(avg["lm_head.weight"], pub["lm_head.weight"])
    rel = meta["shared_divergence"]["embed.weight"]["chat"]
    expect = float(0.3 * pub["embed.weight"].numel() ** 0.5 / pub["embed.weight"].norm())
    assert abs(rel - expect) < 1e-4 and meta["shared_divergence"]["lm_head.weight"]["chat"] == 0.0
    _, kept, meta2 = load_model_dir(merge(public, [a, b], tmp_path / "pub", shared="public"))
    assert torch.equal(kept["embed.weight"], pub["embed.weight"]) and meta2["shared"] == "public"
