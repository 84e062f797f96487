"""Preemption: on SIGUSR1 (or the PREEMPT file the sbatch trap writes) the trainer finishes the
step, checkpoints, requeues through scontrol, and the requeued run resumes bit-identically."""

import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from flexmoe.data import ByteTokenizer, prepare_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("preempt")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[p-q]*.py"))[:6]
    prepare_data(files, root / "data", ByteTokenizer(), progress=False)
    bindir = root / "bin"
    bindir.mkdir()
    (bindir / "scontrol").write_text(f'#!/usr/bin/env bash\necho "scontrol $*" >> {root}/scontrol.log\n')
    (bindir / "scontrol").chmod(0o755)
    e = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PATH=f"{bindir}:{os.environ['PATH']}",
             SLURM_JOB_ID="777", OMP_NUM_THREADS="1")
    return root, e


def _cmd(out, data):
    return [sys.executable, "-m", "flexmoe.cli", "train", f"out_dir={out}", f"+data.train.code={data}",
            "model.d_model=32", "model.num_layers=2", "model.d_ff=64", "data.seq_len=64", "data.batch_size=4",
            "trainer.steps=150", "trainer.log_every=1", "trainer.threads=1", "optim.warmup_steps=5"]


@pytest.mark.parametrize("how", ["signal", "flag_file"])
def test_preempt_checkpoint_requeue_resume(env, how):
    root, e = env
    out = root / f"run-{how}"
    proc = subprocess.Popen(_cmd(out, root / "data"), env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        m = out / "metrics.jsonl"
        if m.exists() and sum(1 for l in m.read_text().splitlines() if '"loss"' in l) >= 5:
            break
        time.sleep(0.2)
    if how == "signal":
        proc.send_signal(signal.SIGUSR1)
    else:
        (out / "PREEMPT").touch()
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts and (ckpts[-1] / "COMPLETE").exists(), output[-2000:]
    stopped = int(ckpts[-1].name.split("-")[1])
    assert 5 <= stopped < 150 and not (out / "final").exists()
    assert "scontrol requeue 777" in (root / "scontrol.log").read_text()
    assert not (out / "PREEMPT").exists()
    # the requeued job: same command, no flags changed
    r = subprocess.run(_cmd(out, root / "data"), env=e, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = root / "reference"
    if not (ref / "final").exists():
        r = subprocess.run(_cmd(ref, root / "data"), env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(str(out / "final" / "model.safetensors"))
    b = load_file(str(ref / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert json.loads((out / "final" / "flexmoe.json").read_text())["tokens_seen"] == 150 * 4 * 64
