"""DP-SGD inside the ordinary trainer: checkpoints carry the sampler and noise state, so a run
killed with SIGKILL and resumed gives the bit-identical model, losses and epsilon of an unbroken
one; DP runs log epsilon per step and write the dp record into final/."""

import json
import os
import subprocess
import sys

import pytest
import torch
from privhelpers import BYTE_TINY, make_byte_public, prepared_text, stdlib_text

from flexmoe.flex.branch import branch
from flexmoe.io.model_dir import load_model_dir
from flexmoe.train.checkpoint import complete_checkpoints

CFG = BYTE_TINY.replace(d_model=32, d_ff=64)


@pytest.fixture(scope="module")
def owner(tmp_path_factory):
    pytest.importorskip("opacus")
    root = tmp_path_factory.mktemp("dp-trainer")
    anchor = branch(make_byte_public(root, CFG), root / "anchor")
    return root, anchor, prepared_text(root, "code", stdlib_text(40_000))


def _train(root, anchor, data, out, kill_at=None):
    args = [f"out_dir={out}", f"init_from={anchor}", "stage=expert_anchor", "stage.public_mix=0",
            f"+data.train.code={data}", f"+data.val.code={data}", "data.seq_len=48", "data.batch_size=8",
            "trainer.steps=8", "trainer.save_every=2", "trainer.log_every=1", "trainer.eval_batches=1",
            "trainer.threads=1", "privacy.enabled=true", "privacy.noise_multiplier=1.0", "privacy.delta=1e-4",
            "privacy.noise_seed=0"]
    env = dict(os.environ, FLEXMOE_QUIET="1")
    env.pop("FLEXMOE_TEST_KILL_AT", None)
    if kill_at:
        env["FLEXMOE_TEST_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "flexmoe.cli", "train", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def _records(out):
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "epsilon" in r:
            recs[r["step"]] = (r["loss"], r["epsilon"], r["batch_size"])  # a resumed run's record wins
    return recs


def test_dp_run_killed_and_resumed_is_bit_identical(owner):
    root, anchor, data = owner
    ref = _train(root, anchor, data, root / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _train(root, anchor, data, root / "run", kill_at="train-step-5")
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (root / "run" / "final").exists()
    assert [p.name for p in complete_checkpoints(root / "run" / "checkpoints")][-1].endswith("4")
    resumed = _train(root, anchor, data, root / "run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]

    _, a, meta_a = load_model_dir(root / "ref" / "final")
    _, b, meta_b = load_model_dir(root / "run" / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["dp"] == meta_b["dp"] and meta_a["dp"]["steps"] == 8 and meta_a["dp"]["epsilon"] > 0
    assert meta_a["dp"]["clipping"] == "book_keeping"
    ra, rb = _records(root / "ref"), _records(root / "run")
    assert sorted(ra) == list(range(1, 9)) and ra == rb
    assert len({r[2] for r in ra.values()}) > 1  # Poisson batches: the sizes vary, and were replayed exactly
    assert meta_a["shared_unchanged"] is True
