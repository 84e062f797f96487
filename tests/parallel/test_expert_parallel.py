"""ExpertParallel on one MoE layer: outputs and gradients equal the single-process layer's, with
tokens crossing ranks both ways, frozen anchor slots computed locally, ranks that hold no
trainable expert (FlexOlmo's 2 experts on ep=2), and experts that receive no tokens."""

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import parallelize_module

from disthelpers import run_distributed
from flexmoe.config import ModelConfig
from flexmoe.model.moe import MoE
from flexmoe.parallel.expert import ExpertParallel

CASES = {
    "anchor_2experts": (ModelConfig(d_model=16, num_heads=2, d_ff=24, num_experts=2, top_k=2), 1),
    # a -1e4 router bias keeps expert 3 (on rank 1) from ever getting a token
    "4experts_top1_idle": (ModelConfig(d_model=16, num_heads=2, d_ff=24, num_experts=4, top_k=1, router_bias=True), 0),
    "anchor_4experts": (ModelConfig(d_model=16, num_heads=2, d_ff=24, num_experts=4, top_k=2), 1),
}


def _layer(cfg, num_frozen):
    torch.manual_seed(0)
    moe = MoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    if moe.router.bias is not None:
        moe.router.bias.data.fill_(0.0)[-1] = -1e4
    moe.experts.freeze_leading(num_frozen)
    return moe


def _inputs(cfg, rank):
    x = torch.randn(2, 6, cfg.d_model, generator=torch.Generator().manual_seed(10 + rank))
    return x.requires_grad_(True)


def _grads(moe):
    out = {}
    for n, p in moe.named_parameters():
        if p.grad is not None:
            g = p.grad
            out[n] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return out


def _ep_rank(rank, world_size, case):
    cfg, nf = CASES[case]
    moe = _layer(cfg, nf)
    parallelize_module(moe.experts, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",)), ExpertParallel())
    x = _inputs(cfg, rank)
    y = moe(x)
    y.pow(2).sum().backward()
    return y.detach(), x.grad, _grads(moe)


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_matches_one_process(case):
    cfg, nf = CASES[case]
    results = run_distributed(_ep_rank, 2, case)
    ref = _layer(cfg, nf)
    grads = {}
    for rank, (y, x_grad, _) in enumerate(results):
        x = _inputs(cfg, rank)
        y_ref = ref(x)
        y_ref.pow(2).sum().backward()
        torch.testing.assert_close(y, y_ref.detach(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_grad, x.grad, rtol=1e-4, atol=1e-5)
    grads = _grads(ref)  # accumulated over both ranks' inputs, as EP's expert gradients are
    for name, g in grads.items():
        if ".experts." in name:  # expert gradients: complete on every rank after the all-to-all
            torch.testing.assert_close(results[0][2][name], g, rtol=1e-4, atol=1e-5)
    assert not any("_frozen" in n for n in results[0][2]), "frozen slots must get no gradient"
