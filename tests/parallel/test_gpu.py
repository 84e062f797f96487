"""GPU-only paths behind the same interfaces: NCCL process groups and grouped-GEMM experts.
Skipped without CUDA (tests/conftest.py); the multi-rank ones need 2 GPUs."""

import pytest
import torch

from disthelpers import run_distributed
from parhelpers import losses, run_cfg, train_on_rank

pytestmark = pytest.mark.gpu


def _two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")


@pytest.mark.parametrize("parallel", [{"dp_shard": -1}, {"ep": 2}, {"tp": 2}], ids=["fsdp", "ep2", "tp2"])
def test_nccl_layout_matches_one_gpu(pdata, tmp_path, parallel):
    _two_gpus()
    train_on_rank(0, 1, [run_cfg(pdata, tmp_path / "one", freeze="expert_anchor")])
    cfg = run_cfg(pdata, tmp_path / "two", world=2, freeze="expert_anchor", backend="nccl", **parallel)
    run_distributed(train_on_rank, 2, [cfg], backend="nccl")
    ref, got = losses(tmp_path / "one"), losses(tmp_path / "two")
    # TF32 and cuBLAS reductions differ between layouts more than on CPU
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) < 1e-3


def _ep_grouped_rank(rank, world_size):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    from flexmoe.config import ModelConfig
    from flexmoe.model.moe import MoE
    from flexmoe.parallel.expert import ExpertParallel

    torch.manual_seed(0)
    cfg = ModelConfig(d_model=64, num_heads=2, d_ff=128, num_experts=4, top_k=2, moe_impl="grouped")
    moe = MoE(cfg).cuda().to(torch.bfloat16)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ref = MoE(cfg.replace(moe_impl="loop")).cuda().to(torch.bfloat16)
    ref.load_state_dict(moe.state_dict())
    parallelize_module(moe.experts, init_device_mesh("cuda", (world_size,), mesh_dim_names=("ep",)), ExpertParallel())
    x = torch.randn(2, 16, 64, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda").manual_seed(rank))
    return moe(x).float().cpu(), ref(x).float().cpu()


def test_grouped_gemm_experts_under_expert_parallel():
    _two_gpus()
    for got, ref in run_distributed(_ep_grouped_rank, 2, backend="nccl"):
        torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
