"""SLURM templates against stand-in srun/scontrol, and a local Hydra sweep through submitit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_SCONTROL = """#!/usr/bin/env bash
if [ "$1" = "show" ] && [ "$2" = "hostnames" ]; then printf '%s\\n' $FAKE_HOSTS; exit 0; fi
echo "scontrol $*" >> "$FAKE_LOG"
"""
FAKE_SRUN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$FAKE_LOG.srun"
"""


def _fake_bin(tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    return bindir


@pytest.mark.parametrize("nodes,hosts,gpus,expect_gpus", [(1, "gpu7", "h100:4", "4"),
                                                          (2, "node01 node02", "8", "8")])
def test_train_sbatch_builds_torchrun(tmp_path, nodes, hosts, gpus, expect_gpus):
    bindir = _fake_bin(tmp_path)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_HOSTS=hosts, FAKE_LOG=str(tmp_path / "log"),
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST="whatever", SLURM_JOB_ID="4242",
               FLEXMOE_RUN_DIR=str(tmp_path / "runs" / "4242"))
    env.pop("SLURM_GPUS_ON_NODE", None)
    env["SLURM_GPUS_PER_NODE"] = gpus
    r = subprocess.run(["bash", str(ROOT / "slurm" / "train.sbatch"), "stage=expert_anchor", "trainer.steps=10"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "log.srun").read_text().split("\n")
    assert args[:2] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert "torch.distributed.run" in args
    assert f"--nnodes={nodes}" in args and f"--nproc-per-node={expect_gpus}" in args
    assert f"--rdzv-endpoint={hosts.split()[0]}:29500" in args and "--rdzv-id=4242" in args
    i = args.index("flexmoe.cli")
    assert args[i + 1:i + 5] == ["train", f"out_dir={tmp_path / 'runs' / '4242'}", "stage=expert_anchor",
                                 "trainer.steps=10"]
    assert (tmp_path / "runs" / "4242").is_dir()


def test_cpu_job_runs_a_subcommand(tmp_path):
    bindir = _fake_bin(tmp_path)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"))
    r = subprocess.run(["bash", str(ROOT / "slurm" / "cpu_job.sbatch"), "merge", "pub", "pkg", "--out", "m"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    args = (tmp_path / "log.srun").read_text().split("\n")
    assert args[args.index("flexmoe.cli") + 1:][:5] == ["merge", "pub", "pkg", "--out", "m"]


def test_submitit_local_sweep_writes_one_dir_per_job(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from flexmoe.data import ByteTokenizer, prepare_data

    text = tmp_path / "t.txt"
    text.write_text((ROOT / "src" / "flexmoe" / "model" / "moe.py").read_text() * 3)
    prepare_data([text], tmp_path / "d", ByteTokenizer(), progress=False)
    sweep = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run(
        [sys.executable, "-m", "flexmoe.cli", "train", "--multirun", "hydra/launcher=submitit_local",
         f"out_dir={sweep}", f"+data.train.code={tmp_path / 'd'}", "model.d_model=32", "model.num_layers=1",
         "model.d_ff=64", "data.seq_len=32", "data.batch_size=2", "trainer.steps=3", "trainer.threads=1",
         "optim.lr=1e-3,2e-3", "trainer.seed=0,1", "hydra.launcher.timeout_min=5"],
        env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    for p in runs:
        assert (p / "final" / "model.safetensors").is_file() and (p / "metrics.jsonl").is_file()
    from omegaconf import OmegaConf

    grid = sorted((float(c.optim.lr), int(c.trainer.seed)) for c in
                  (OmegaConf.load(p / ".hydra" / "config.yaml") for p in runs))
    assert grid == [(1e-3, 0), (1e-3, 1), (2e-3, 0), (2e-3, 1)]
