"""The training loop: loss falls, frozen tensors stay bit-identical, resume is bit-identical."""

import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flexmoe.config.train import RunConfig
from flexmoe.io.model_dir import load_model_dir
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.flex.branch import branch
from flexmoe.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
STDLIB = Path(sysconfig.get_paths()["stdlib"])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    files = sorted(STDLIB.glob("[a-c]*.py"))[:12]
    prepare_data(files[:10], root / "train", ByteTokenizer(), progress=False)
    prepare_data(files[10:], root / "val", ByteTokenizer(), progress=False)
    # a second domain for the expert: arithmetic, which the public model never saw
    import random

    rng = random.Random(0)
    for split, n in (("math_train", 3000), ("math_val", 300)):
        lines = [f"{a} + {b} = {a + b}" for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]
        (root / f"{split}.txt").write_text("\n".join(lines))
        prepare_data([root / f"{split}.txt"], root / split, ByteTokenizer(), progress=False)
    return root


def _cfg(out, data, **over):
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir = str(out)
    cfg.model.update(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=64)
    cfg.data.train = {"code": str(data / "train")}
    cfg.data.val = {"code": str(data / "val")}
    cfg.data.update(seq_len=64, batch_size=8)
    cfg.trainer.update(steps=40, log_every=10, threads=1)
    cfg.optim.update(lr=3e-3, warmup_steps=4)
    for k, v in over.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


@pytest.fixture(scope="module")
def public_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("public") / "run"
    return out, train(_cfg(out, data))


def test_public_pretraining_loss_falls(public_run, data):
    out, res = public_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # bytes start near ln(258) = 5.55; 40 steps of a tiny model must get well below that
    assert losses[0] > 3.5 and losses[-1] < 0.8 * losses[0], losses
    assert res["val_loss"]["code"] < 4.0
    assert all(r["tokens_per_s"] > 0 and r["mfu"] > 0 for r in records if "loss" in r)
    _, sd, meta = load_model_dir(res["final"])
    assert meta["kind"] == "public" and meta["fingerprint"] and meta["tokens_seen"] == 40 * 8 * 64
    # provenance: command line, package versions, and each data manifest's sha256
    import hashlib

    info = json.loads((out / "run_info.json").read_text())
    assert info["packages"]["torch"].startswith("2.") and len(info["command"]) > 1
    cfg_data = _cfg(out, data).data
    assert info["data"] == {
        "train/code": hashlib.sha256((Path(cfg_data.train["code"]) / "manifest.json").read_bytes()).hexdigest(),
        "val/code": hashlib.sha256((Path(cfg_data.val["code"]) / "manifest.json").read_bytes()).hexdigest()}


def test_expert_training_keeps_frozen_tensors_bit_identical(tmp_path, data, public_run):
    anchor = branch(public_run[1]["final"], tmp_path / "anchor")
    res = train(_cfg(tmp_path / "expert", data, init_from=str(anchor), **{
        "stage.freeze": "expert_anchor", "stage.name": "expert_anchor",
        "data.train": {"math": str(data / "math_train")}, "data.val": {"math": str(data / "math_val")}}))
    _, before, _ = load_model_dir(anchor)
    _, after, meta = load_model_dir(res["final"])
    changed = []
    for k, v in before.items():
        if ".experts." in k:
            assert torch.equal(after[k][0], v[0]), f"anchor slot of {k} moved"
            changed.append(not torch.equal(after[k][1], v[1]))
        elif ".router." in k:
            assert torch.equal(after[k][0], v[0]), f"public router row of {k} moved"
            changed.append(not torch.equal(after[k][1], v[1]))
        else:
            assert torch.equal(after[k], v), f"shared tensor {k} moved"
    assert all(changed), "every expert-1 tensor and router row 1 must have trained"
    assert meta["shared_unchanged"] is True
    # a new domain: 40 steps of the expert alone (everything shared frozen, d_model 32) must cut the
    # loss by 4% (seen: 4.96 -> 4.73); a frozen or unrouted expert would leave it unchanged
    assert res["val_loss"]["math"] < 0.96 * _initial_val_loss(anchor, data / "math_val")


def _initial_val_loss(model_dir, data):
    from flexmoe.train.load import load_model
    from flexmoe.data import TokenWindows
    from flexmoe.train.trainer import evaluate_loss

    model, _, _ = load_model(model_dir)
    return evaluate_loss(model, TokenWindows(data, 64), 8, 8)


def test_no_optimizer_state_for_frozen_parameters(tmp_path):
    from flexmoe.config import ModelConfig
    from flexmoe.config.train import OptimConfig
    from flexmoe.train.freeze import PLANS, apply_freeze_plan
    from flexmoe.model import Transformer
    from flexmoe.train.optim import build_optimizer

    m = Transformer(ModelConfig(vocab_size=50, d_model=16, num_layers=2, num_heads=2, d_ff=24, num_experts=2))
    apply_freeze_plan(m, PLANS["expert_anchor"])
    opt = build_optimizer(m, OptimConfig())
    in_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    # expert 1's three matrices per layer + both router rows (row 0 masked, not removed)
    assert in_opt == 2 * (3 * 16 * 24 + 2 * 16)
    assert not any(p.requires_grad for n, p in m.named_parameters() if "_frozen" in n or ".attn." in n)


def test_resume_is_bit_identical(tmp_path, data):
    full = train(_cfg(tmp_path / "full", data, **{"trainer.steps": 12}))
    part = train(_cfg(tmp_path / "part", data, **{"trainer.steps": 12, "trainer.stop_after": 5}))
    assert part["stopped_at"] == 5 and not (tmp_path / "part" / "final").exists()
    resumed = train(_cfg(tmp_path / "part", data, **{"trainer.steps": 12}))
    _, a, _ = load_model_dir(full["final"])
    _, b, _ = load_model_dir(resumed["final"])
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["val_loss"] == resumed["val_loss"]


def test_incomplete_checkpoint_is_ignored(tmp_path, data):
    from flexmoe.train.checkpoint import complete_checkpoints

    train(_cfg(tmp_path / "r", data, **{"trainer.steps": 6, "trainer.stop_after": 3}))
    ck = tmp_path / "r" / "checkpoints"
    # a write killed midway leaves a temp dir without the COMPLETE marker
    (ck / ".step-00000005.tmp").mkdir()
    (ck / "step-00000004").mkdir()
    assert [p.name for p in complete_checkpoints(ck)] == ["step-00000003"]


def _cli(*args, timeout=60):
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "flexmoe.cli", *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    return r, time.perf_counter() - t


@pytest.mark.parametrize("override,needle", [("trainer.steps=abc", "trainer.steps"),
                                             ("trainer.nosuchkey=1", "nosuchkey"),
                                             ("stage.freeze=bogus", "stage.freeze"),
                                             ("parallel.tp=3", "parallel.tp")])
def test_bad_override_fails_fast_naming_the_key(tmp_path, override, needle):
    r, secs = _cli("train", f"out_dir={tmp_path}", override)
    assert r.returncode != 0
    assert needle in r.stderr, r.stderr
    assert secs < 5


def test_public_source_without_public_mix_is_announced_with_its_share(tmp_path, data, capsys):
    from flexmoe.train.trainer import build_train_source

    cfg = OmegaConf.to_object(_cfg(tmp_path, data, **{"data.train": {"public": str(data / "train"),
                                                                       "math": str(data / "math_train")}}))
    build_train_source(cfg)
    assert "data.train.public is weighed like the other domains (50% of batches)" in capsys.readouterr().err
    cfg.stage.public_mix = 0.25
    build_train_source(cfg)
    assert "weighed like" not in capsys.readouterr().err


def test_optimizer_choice_refuses_apex_on_dtensors():
    """apex's FusedAdam reads raw pointers: refused on FSDP2/TP DTensors (and off CUDA); auto picks
    torch's foreach on CPU, and the optimizer built from DTensors steps them."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    from flexmoe.config.train import OptimConfig
    from flexmoe.train.optim import build_optimizer, choose_impl

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = torch.nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
        plain = torch.nn.Parameter(torch.randn(8, 4))
        with pytest.raises(ValueError, match="DTensors"):
            choose_impl([w], "apex", apex_available=True)
        with pytest.raises(ValueError, match="CUDA tensors only"):
            choose_impl([plain], "apex", apex_available=True)
        with pytest.raises(ValueError, match="not installed"):
            choose_impl([plain], "apex", apex_available=False)
        assert choose_impl([w], "auto", apex_available=True) == "foreach"
        with pytest.raises(ValueError, match="optim.impl='fast'"):
            choose_impl([plain], "fast", apex_available=False)
        m = torch.nn.Module()
        m.w = w
        opt = build_optimizer(m, OptimConfig(lr=0.1, weight_decay=0.0))
        assert opt.defaults["foreach"] is True
        before = w.full_tensor().clone()
        w.grad = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)])
        opt.step()
        assert isinstance(w, DTensor) and not torch.equal(w.full_tensor(), before)
    finally:
        dist.destroy_process_group()
