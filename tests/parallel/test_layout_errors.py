"""Impossible layouts are refused before anything loads, with one line naming the setting."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flexmoe.config import ModelConfig
from flexmoe.config.parallel import ParallelConfig
from flexmoe.config.train import RunConfig
from flexmoe.parallel.deepspeed import deepspeed_config
from flexmoe.parallel.expert import chunk_sizes
from flexmoe.parallel.mesh import resolve_dims

ROOT = Path(__file__).resolve().parents[2]
MOE = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, num_experts=4)


@pytest.mark.parametrize("world,par,model,needle", [
    (4, dict(tp=3), None, "parallel.tp=3"),
    (2, dict(dp_shard=4), None, "parallel.dp_replicate=1 x dp_shard=4 x tp=1 = 4 but the world size is 2"),
    (2, dict(ep=4), None, "parallel.ep=4 does not divide dp_shard=2"),
    (6, dict(ep=3), MOE, "parallel.ep=3 does not divide model.num_experts=4"),
    (4, dict(tp=4), MOE, "parallel.tp=4 does not divide model.num_kv_heads=2"),
    (2, dict(tp=2), MOE.replace(num_heads=3, head_dim=8, num_kv_heads=1), "does not divide model.num_heads=3"),
    (2, dict(ep=2), MOE.replace(num_experts=0), "parallel.ep=2 needs an MoE model"),
    (2, dict(engine="deepspeed", tp=2), None, "parallel.engine=deepspeed supports data parallelism only"),
    (2, dict(engine="deepspeed", ep=2), None, "use parallel.engine=fsdp"),
    (2, dict(engine="deepspeed", compile=True), None, "parallel.compile=true is not supported"),
    (2, dict(engine="megatron"), None, "parallel.engine='megatron'"),
    (1, dict(ac="some"), None, "parallel.ac='some'"),
])
def test_refused_layouts(world, par, model, needle):
    with pytest.raises(ValueError) as e:
        resolve_dims(ParallelConfig(**par), world, model)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_ep_borrows_from_dp_shard():
    d = resolve_dims(ParallelConfig(tp=2, ep=2), 8, MOE)
    assert (d.dp_replicate, d.dp_shard, d.tp, d.ep, d.edp, d.dp) == (1, 4, 2, 2, 2, 4)
    d = resolve_dims(ParallelConfig(dp_replicate=2, ep=2), 4, MOE)
    assert (d.dp_shard, d.edp, d.dp) == (2, 1, 4)


def test_chunk_sizes_match_dtensor_shard():
    assert chunk_sizes(4, 2) == [2, 2]
    assert chunk_sizes(3, 2) == [2, 1]  # 4 experts, anchor frozen: 3 trainable over ep=2
    assert chunk_sizes(1, 2) == [1, 0]  # FlexOlmo's 2 experts: rank 1 holds no trainable one
    assert chunk_sizes(5, 4) == [2, 2, 1, 0]


def _ds_cfg(**parallel):
    cfg = OmegaConf.structured(RunConfig)
    cfg.data.batch_size, cfg.trainer.grad_accum, cfg.optim.grad_clip = 4, 2, 1.0
    for k, v in parallel.items():
        cfg.parallel[k] = v
    return cfg


def test_deepspeed_config_from_json_and_hydra(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "wall_clock_breakdown": True}))
    out = deepspeed_config(_ds_cfg(engine="deepspeed", deepspeed_config=str(f)), world_size=2)
    assert out["zero_optimization"] == {"stage": 3, "overlap_comm": True} and out["wall_clock_breakdown"]
    sizes = (out["train_micro_batch_size_per_gpu"], out["gradient_accumulation_steps"], out["train_batch_size"])
    assert sizes == (4, 2, 16)
    assert deepspeed_config(_ds_cfg(engine="deepspeed"), 2)["zero_optimization"]["stage"] == 2  # default
    assert deepspeed_config(_ds_cfg(engine="deepspeed", zero_stage=1), 2)["zero_optimization"]["stage"] == 1


@pytest.mark.parametrize("content,needle", [
    ({"optimizer": {"type": "Adam"}}, "remove 'optimizer'"),
    ({"zero_optimization": {"stage": 1}}, "contradicts zero_optimization.stage=1"),
    ({"train_micro_batch_size_per_gpu": 16}, "train_micro_batch_size_per_gpu=16"),
])
def test_deepspeed_json_contradictions_refused(tmp_path, content, needle):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="parallel.deepspeed_config") as e:
        deepspeed_config(_ds_cfg(engine="deepspeed", zero_stage=2, deepspeed_config=str(f)), 2)
    assert needle in str(e.value)


def test_cli_refuses_layout_before_training(tmp_path):
    """conf/parallel/tp_ep.yaml on one process: refused in seconds, naming the setting."""
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flexmoe.cli", "train", f"out_dir={tmp_path}", "parallel=tp_ep"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode != 0 and "parallel.tp=2" in r.stderr, r.stderr[-2000:]
    assert time.perf_counter() - t < 15
    assert not (tmp_path / "checkpoints").exists()


def _train_expect_error(rank: int, world_size: int, cfg: dict) -> str:
    from flexmoe.train.trainer import train

    try:
        train(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    except ValueError as e:
        return str(e)
    return ""


def test_ep_leaving_a_rank_without_trainable_experts_is_refused(pdata, tmp_path):
    """2 experts under the anchor recipe: the anchor is copied to every ep rank and the one
    trainable expert cannot be split over 2 (FSDP crashed on the empty stack while building)."""
    import dataclasses

    from disthelpers import run_distributed
    from flexmoe.io.model_dir import save_model_dir
    from flexmoe.model import Transformer
    from parhelpers import MODEL, run_cfg

    two = dataclasses.replace(MODEL, num_experts=2, top_k=2)
    model = Transformer(two)
    model.reset_parameters(seed=0)
    cfg = run_cfg(pdata, tmp_path / "run", world=2, freeze="expert_anchor", steps=1, ep=2)
    cfg["init_from"] = str(save_model_dir(tmp_path / "init", two, model.state_dict(), {"kind": "moe"}))
    errors = run_distributed(_train_expect_error, 2, cfg)
    for e in errors:
        assert e.startswith("parallel.ep=2 spreads 1 trainable expert(s) over 2 ranks") and "set parallel.ep=1" in e, e
        assert "\n" not in e
    assert not (tmp_path / "run" / "final").exists()
