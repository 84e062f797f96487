"""DP-SGD on 2 gloo ranks with FSDP2: the global Poisson sample is split between the ranks (whole
units), the clipped sums are added over ranks and the noise is added once, so the run gives the
model of one process on the same sample and noise seed, and the same epsilon."""

import pytest
import torch

from disthelpers import run_distributed
from flexmoe.io.model_dir import load_model_dir
from parhelpers import losses, run_cfg, train_on_rank

pytest.importorskip("opacus")


def _dp_cfg(pdata, out, world, unit="window"):
    cfg = run_cfg(pdata, out, world=world, freeze="expert_anchor", steps=4, seq_len=32)
    cfg["data"]["batch_size"] = 8  # privacy: the expected global batch (in units), whatever the world size
    cfg["stage"]["public_mix"] = 0.0
    cfg["trainer"]["save_every"] = 2
    cfg["privacy"].update(enabled=True, noise_multiplier=0.8, max_grad_norm=0.05, delta=1e-4, noise_seed=3, unit=unit,
                         allow_nonprivate_router_init=True)  # the random init has non-zero owner rows
    return cfg


@pytest.mark.parametrize("unit", ["window", "document"])
def test_dp_on_two_fsdp_ranks_equals_one_process(pdata, tmp_path, unit):
    one = run_distributed(train_on_rank, 1, [_dp_cfg(pdata, tmp_path / "one", 1, unit)], timeout=300)[0][0]
    two = run_distributed(train_on_rank, 2, [_dp_cfg(pdata, tmp_path / "two", 2, unit)], timeout=300)
    assert two[0][0]["dp"] == two[1][0]["dp"]  # every rank reports the same record
    d1, d2 = one["dp"], two[0][0]["dp"]
    assert d1["epsilon"] == d2["epsilon"] > 0 and d1["steps"] == d2["steps"] == 4
    assert d1["clipping"] == d2["clipping"] == "book_keeping"
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == [1, 2, 3, 4] and all(abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]) for s in l1), (l1, l2)
    _, a, _ = load_model_dir(tmp_path / "one" / "final")
    _, b, _ = load_model_dir(tmp_path / "two" / "final")
    _, init, _ = load_model_dir(pdata["init"])
    moved = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4, msg=k)
        moved += not torch.equal(a[k], init[k])
    assert moved >= 2  # the trainable expert and router rows moved, identically


def test_dp_on_two_ranks_resumes_bit_identically(pdata, tmp_path):
    full = _dp_cfg(pdata, tmp_path / "full", 2)
    first = _dp_cfg(pdata, tmp_path / "part", 2)
    first["trainer"]["stop_after"] = 2
    second = _dp_cfg(pdata, tmp_path / "part", 2)
    out = run_distributed(train_on_rank, 2, [full, first, second], timeout=300)
    assert out[0][1]["status"] == "stopped" and out[0][1]["stopped_at"] == 2
    assert out[0][2]["dp"] == out[0][0]["dp"]  # the resumed run accounts for the steps before the stop
    _, a, _ = load_model_dir(tmp_path / "full" / "final")
    _, b, _ = load_model_dir(tmp_path / "part" / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "part")


def test_dp_on_two_ranks_killed_and_resumed(pdata, tmp_path):
    """kill -9 of a 2-rank DP run (torchrun through launch/run.py) after a checkpoint, then the same
    command again: the final model, losses and epsilon equal those of an unbroken 2-rank run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from flexmoe.train.checkpoint import complete_checkpoints
    from test_kill_resume import _descendants, _finish

    ref_cfg = _dp_cfg(pdata, tmp_path / "ref", 2)
    ref_cfg["trainer"]["steps"] = 12
    ref = run_distributed(train_on_rank, 2, [ref_cfg], timeout=300)[0][0]
    run = tmp_path / "run"
    args = [f"out_dir={run}", f"init_from={pdata['init']}", f"+data.train.code={pdata['train']}", "stage=expert_anchor",
            "stage.public_mix=0", "data.seq_len=32", "data.batch_size=8", "trainer.steps=12", "trainer.log_every=1",
            "trainer.save_every=2", "trainer.keep_last=3", "optim.lr=3e-3", "optim.warmup_steps=2", "parallel=fsdp",
            "trainer.dtype=fp32", "privacy.enabled=true", "privacy.noise_multiplier=0.8", "privacy.max_grad_norm=0.05",
            "privacy.delta=1e-4", "privacy.noise_seed=3", "privacy.allow_nonprivate_router_init=true"]
    root = Path(__file__).resolve().parents[2]

    def launch():
        return subprocess.Popen([sys.executable, str(root / "launch" / "run.py"), "--nproc", "2", "--threads", "1",
                                 "--", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)

    proc = launch()
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step-00000004" / "COMPLETE").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.05)
    for pid in [proc.pid, *_descendants(proc.pid)]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "final").exists() and len(complete_checkpoints(run / "checkpoints")) >= 1
    _finish(launch())
    _, a, meta_a = load_model_dir(tmp_path / "ref" / "final")
    _, b, meta_b = load_model_dir(run / "final")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["dp"]["epsilon"] == meta_b["dp"]["epsilon"] == ref["dp"]["epsilon"]
    assert losses(tmp_path / "ref") == losses(run)
