"""The meta-device build (train/build.py: each rank fills only its own shards) trains exactly like
the old full build (every rank loads the whole model, FLEXMOE_FULL_BUILD=1) on every layout, from
an fp32 or a bf16 init_from and from a fresh init (ZeRO-3 included); frozen tensors keep the stored dtype in memory
and final/ writes every tensor in it; checkpoints leave frozen tensors out and refuse a resume
from another init_from."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from disthelpers import run_distributed
from flexmoe.io.fingerprint import fingerprint
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.train.build import FULL_BUILD_ENV
from parhelpers import MODEL, losses, run_cfg

LAYOUTS = {  # name -> (processes, parallel settings)
    "single": (1, {}),
    "fsdp2": (2, {"dp_shard": -1}),
    "tp2": (2, {"tp": 2}),
    "ep2": (2, {"ep": 2, "ac": "full"}),
    "tp2_dp2": (4, {"tp": 2}),
    # one tensor at a time through deepspeed.zero.Init (ZeRO 1/2 replicate: the "single" build)
    "zero3": (2, {"engine": "deepspeed", "zero_stage": 3}),
}


def _train_cases(rank: int, world_size: int, cases: list[tuple[dict, bool]]) -> list[dict]:
    """Rank body: each (config, full build?) in turn, and what the model held after building."""
    from omegaconf import OmegaConf

    from flexmoe.config.train import RunConfig
    from flexmoe.train import trainer

    seen = []
    real = trainer.build_for_training

    def spy(*a, **k):
        built = real(*a, **k)
        seen.append({n: (p.dtype, p.requires_grad) for n, p in built.model.named_parameters()})
        return built

    trainer.build_for_training = spy
    try:
        for cfg, full in cases:
            os.environ[FULL_BUILD_ENV] = "1" if full else "0"
            trainer.train(OmegaConf.merge(OmegaConf.structured(RunConfig), cfg))
    finally:
        trainer.build_for_training = real
        os.environ.pop(FULL_BUILD_ENV, None)
    return seen


def _run(world: int, cases):
    if world == 1:
        return [_train_cases(0, 1, cases)]
    return run_distributed(_train_cases, world, cases)


@pytest.fixture(scope="module")
def bf16_init(pdata, tmp_path_factory):
    """pdata's model stored in bf16 (as public models are), shared tensors frozen from it."""
    _, sd, meta = load_model_dir(pdata["init"])
    out = tmp_path_factory.mktemp("bf16") / "init"
    return save_model_dir(out, MODEL, {k: v.bfloat16() for k, v in sd.items()}, {"kind": "moe"})


def _cases(pdata, bf16_init, root, world, parallel):
    """(name, config) pairs: fp32 and bf16 init_from under the anchor recipe, and a fresh model."""
    out = []
    for name, init in (("fp32", pdata["init"]), ("bf16", bf16_init)):
        c = run_cfg(pdata, root / name, world=world, freeze="expert_anchor", steps=3, **parallel)
        c["init_from"] = str(init)
        out.append((name, c))
    fresh = run_cfg(pdata, root / "fresh", world=world, freeze="none", steps=3, **parallel)
    fresh["init_from"] = None
    fresh["model"].update(dataclasses.asdict(MODEL))
    out.append(("fresh", fresh))
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sharded_build_trains_like_the_full_build(layout, pdata, bf16_init, tmp_path):
    world, parallel = LAYOUTS[layout]
    if parallel.get("engine") == "deepspeed":
        pytest.importorskip("deepspeed")
    cases = []
    for path in ("full", "sharded"):
        for name, c in _cases(pdata, bf16_init, tmp_path / path, world, parallel):
            cases.append((c, path == "full"))
    seen = _run(world, cases)[0]  # rank 0's parameters after each build
    for i, (name, _) in enumerate(_cases(pdata, bf16_init, tmp_path, world, parallel)):
        full, sharded = tmp_path / "full" / name, tmp_path / "sharded" / name
        a, b = losses(full), losses(sharded)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        assert all(abs(a[s] - b[s]) <= 1e-5 * abs(a[s]) for s in a), (name, a, b)
        _, fa, ma = load_model_dir(full / "final")
        _, fb, mb = load_model_dir(sharded / "final")
        assert fa.keys() == fb.keys()
        for k in fa:
            assert fa[k].dtype == fb[k].dtype and torch.allclose(fa[k].float(), fb[k].float(), rtol=1e-5, atol=1e-7), k
        # the fingerprint written in the same pass is the one of the tensors written
        assert mb["fingerprint"] == fingerprint(fb)
        if name != "fresh":
            # frozen tensors bit-identical to init_from and in its dtype, in memory and on disk
            _, before, _ = load_model_dir(pdata["init"] if name == "fp32" else bf16_init)
            for k, v in before.items():
                assert fb[k].dtype == v.dtype, k
                frozen = v[:1] if (".experts." in k or ".router." in k) else v
                assert torch.equal(fb[k][:len(frozen)], frozen), f"{name}: frozen {k} moved"
            want = torch.bfloat16 if name == "bf16" else torch.float32
            params = seen[len(seen) // 2 + i]  # the sharded run of this case
            for n, (dtype, trainable) in params.items():
                assert dtype == (torch.float32 if trainable else want), (name, n, dtype)
            if parallel.get("engine") == "deepspeed":  # its own checkpoint format (test_checkpoint_reshard)
                continue
            # checkpoints hold no frozen tensor: they come from init_from
            ckpt = sharded / "checkpoints" / "step-00000003"
            keys = {k.split(".", 1)[1] for k in FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
                    if k.startswith("model.")}
            assert keys and all(params[k][1] for k in keys), sorted(keys)
            assert any("_frozen" in n for n in params) and not any("_frozen" in k for k in keys)


def test_resume_refuses_another_init_from(pdata, bf16_init, tmp_path):
    """Frozen tensors are not in checkpoints, so resuming from another init_from would silently mix
    models: the resume names the checkpoint and refuses."""
    from flexmoe.train.checkpoint import complete_checkpoints

    c = run_cfg(pdata, tmp_path / "run", freeze="expert_anchor", steps=4)
    c["trainer"]["stop_after"] = 2
    _run(1, [(c, False)])
    assert complete_checkpoints(tmp_path / "run" / "checkpoints")
    c2 = dict(c, init_from=str(bf16_init))
    c2["trainer"] = dict(c["trainer"], stop_after=0)
    with pytest.raises(ValueError, match="resume with the same init_from"):
        _run(1, [(c2, False)])
    _run(1, [(dict(c2, init_from=c["init_from"]), False)])  # the same init_from resumes
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4]


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_bf16_keeps_frozen_tensors_as_stored(pdata, tmp_path, stage):
    """trainer.dtype=bf16 under DeepSpeed is bf16 compute over fp32 masters: DeepSpeed's own bf16
    mode would round an fp32 anchor and the frozen router row (it did, under ZeRO 2)."""
    pytest.importorskip("deepspeed")
    c = run_cfg(pdata, tmp_path / "run", world=2, freeze="expert_anchor", steps=2, engine="deepspeed",
                zero_stage=stage)
    c["trainer"]["dtype"] = "bf16"
    run_distributed(_train_cases, 2, [(c, False)])
    _, before, _ = load_model_dir(pdata["init"])
    _, after, _ = load_model_dir(tmp_path / "run" / "final")
    for k, v in before.items():
        sliced = (".experts." in k or ".router." in k)
        assert after[k].dtype == v.dtype == torch.float32, k
        assert torch.equal(after[k][:1] if sliced else after[k], v[:1] if sliced else v), f"frozen {k} moved"
        if sliced:
            assert not torch.equal(after[k][1:], v[1:]), f"{k}: trainable slots did not train"
