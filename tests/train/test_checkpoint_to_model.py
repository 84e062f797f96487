"""`flexmoe checkpoint-to-model` (issue 18, point 6): a checkpoint of an anchor-recipe run (frozen
tensors not in it) becomes the model that `final/` is when the run ends at that step."""

import json

import torch

from flexmoe.io.model_dir import load_model_dir

from test_run_dirs import SMALL, _flexmoe, work  # noqa: F401  (the prepared data fixture)


def test_checkpoint_becomes_the_model_final_would_be(work, tmp_path):  # noqa: F811  (the fixture)
    data = f"+data.train.t={work / 'data'}"
    pub = tmp_path / "pub"
    assert _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=2", f"out_dir={pub}").returncode == 0
    anchor = tmp_path / "anchor"
    r = _flexmoe(tmp_path, "branch", str(pub / "final"), str(anchor))
    assert r.returncode == 0, r.stderr[-2000:]
    # the same run twice: one stops at step 3 (checkpoint), one ends at step 3 (final/)
    # a constant learning rate: the two runs differ in trainer.steps, which shapes the cosine schedule
    common = [*SMALL, data, "stage=expert_anchor", f"init_from={anchor}", "trainer.save_every=3", "stage.public_mix=0",
              "optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]
    r = _flexmoe(tmp_path, "train", *common, "trainer.steps=3", f"out_dir={tmp_path / 'end'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _flexmoe(tmp_path, "train", *common, "trainer.steps=6", "trainer.stop_after=3", f"out_dir={tmp_path / 'mid'}")
    assert r.returncode == 0, r.stderr[-2000:]
    step = tmp_path / "mid" / "checkpoints" / "step-00000003"
    # the checkpoint holds no frozen tensor; a model reader says what to do with it
    r = _flexmoe(tmp_path, "eval", str(step), "--data", f"t={work / 'data'}")
    assert r.returncode == 2 and f"checkpoint-to-model {step}" in r.stderr.strip().splitlines()[-1]
    out = tmp_path / "model"
    r = _flexmoe(tmp_path, "checkpoint-to-model", str(step), str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["step"] == 3
    _, got, meta = load_model_dir(out)
    _, want, want_meta = load_model_dir(tmp_path / "end" / "final")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert meta["base_fingerprint"] == want_meta["base_fingerprint"] and meta["shared_unchanged"] is True
    # and it packages like final/ does
    r = _flexmoe(tmp_path, "package", str(out), str(tmp_path / "pkg"), "--owner", "o", "--domain", "t")
    assert r.returncode == 0, r.stderr[-2000:]
    # refused: an existing output, a directory that is no checkpoint
    r = _flexmoe(tmp_path, "checkpoint-to-model", str(step), str(out))
    assert r.returncode == 2 and "--overwrite" in r.stderr.strip().splitlines()[-1]
    r = _flexmoe(tmp_path, "checkpoint-to-model", str(anchor), str(tmp_path / "x"))
    assert r.returncode == 2 and "not a complete flexmoe training checkpoint" in r.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*")) and not list(tmp_path.glob(".model.*"))
