"""A checkpoint saved at one layout loads at another: parameters bit-identical, and training goes
on as it would have (optimizer state and data position included)."""

import shutil

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from disthelpers import run_distributed
from flexmoe.io.model_dir import load_model_dir
from flexmoe.model.moe import canonical_state_dict
from parhelpers import losses, run_cfg, train_on_rank

K, N = 3, 5  # checkpoint after step K, train on to N


def _run(world, cfgs):
    if world == 1:
        train_on_rank(0, 1, cfgs)
    else:
        run_distributed(train_on_rank, world, cfgs)


@pytest.mark.parametrize("a,b", [
    ((4, {"ep": 2}), (1, {})),  # 4 ranks: FSDP over 4 with experts split over ep=2 -> one process
    ((2, {}), (2, {"tp": 2})),  # FSDP over 2 -> tensor parallel over 2
], ids=["ep2x4ranks->single", "fsdp2->tp2"])
def test_reshard_round_trip(pdata, tmp_path, a, b):
    (world_a, par_a), (world_b, par_b) = a, b
    src = tmp_path / "a"
    cfg_a = run_cfg(pdata, src, world=world_a, freeze="expert_anchor", steps=N, **par_a)
    cfg_a["trainer"]["save_every"] = K
    cfg_a["trainer"]["checkpoint_frozen"] = True  # below, the checkpoint is compared as a whole model
    _run(world_a, [cfg_a])
    ckpt = src / "checkpoints" / f"step-{K:08d}"
    for name in ("cont", "load"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, tmp_path / name / "checkpoints" / ckpt.name)
    _run(world_b, [run_cfg(pdata, tmp_path / "cont", world=world_b, freeze="expert_anchor", steps=N, **par_b),
                   # steps=K: resume, train nothing, write what was loaded as final/
                   run_cfg(pdata, tmp_path / "load", world=world_b, freeze="expert_anchor", steps=K, **par_b)])

    dcp_to_torch_save(ckpt, tmp_path / "saved.pt")
    saved = canonical_state_dict(torch.load(tmp_path / "saved.pt", weights_only=False)["model"])
    _, loaded, _ = load_model_dir(tmp_path / "load" / "final")
    assert saved.keys() == loaded.keys()
    for k in saved:
        assert torch.equal(saved[k], loaded[k]), f"{k} changed in the round trip"

    got, ref = losses(tmp_path / "cont"), losses(src)
    assert sorted(got) == list(range(K + 1, N + 1)), "the loaded run must start after step K"
    # Two layouts sum in different orders (~1e-7); a lost optimizer state or data position
    # shows at step K+2 as a difference of 1e-3 or more.
    for s in got:
        assert abs(got[s] - ref[s]) / ref[s] < 2e-6, (s, got, ref)


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoint_resumes_bit_identically(pdata, tmp_path, stage):
    """DeepSpeed writes its own format inside our atomic directory, without the frozen tensors
    (they come from init_from again); it resumes under DeepSpeed, bit-identically, and is refused,
    naming the engine to use, by the fsdp engine."""
    pytest.importorskip("deepspeed")

    def cfg(out, **trainer):
        c = run_cfg(pdata, out, world=2, freeze="expert_anchor", steps=4, engine="deepspeed", zero_stage=stage)
        c["trainer"].update(trainer)
        return c

    run_distributed(train_on_rank, 2, [cfg(tmp_path / "full"), cfg(tmp_path / "part", stop_after=2),
                                       cfg(tmp_path / "part")])
    assert losses(tmp_path / "part")[4] == losses(tmp_path / "full")[4]
    # the module states DeepSpeed wrote hold what trains, not the frozen anchor and shared layers
    states = list((tmp_path / "full" / "checkpoints" / "step-00000004" / "deepspeed").glob("*model_states.pt"))
    model = sum(f.stat().st_size for f in (tmp_path / "full" / "final").glob("*.safetensors"))
    assert states and sum(f.stat().st_size for f in states) < 0.6 * model, ([f.stat().st_size for f in states], model)
    _, a, _ = load_model_dir(tmp_path / "full" / "final")
    _, b, _ = load_model_dir(tmp_path / "part" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="resume with parallel.engine=deepspeed"):
        again = run_cfg(pdata, tmp_path / "part", freeze="expert_anchor", steps=6)
        again["trainer"]["overwrite_final"] = True  # the run finished: going on past it is asked for explicitly
        train_on_rank(0, 1, [again])
