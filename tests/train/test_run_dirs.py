"""Run directories (issue 18, point 3): a fresh directory per run by default, resume only into a
checkpoint of the same model and plan, and a finished run never silently trained again."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexmoe.commands.train import default_run_dir

SMALL = ["model=tiny", "data.seq_len=32", "data.batch_size=2", "trainer.log_every=1", "trainer.threads=1"]


def _flexmoe(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexmoe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    (root / "t.txt").write_text("the run directory keeps one run. " * 300)
    r = _flexmoe(root, "prepare-data", "t.txt", "--out", "data")
    assert r.returncode == 0, r.stderr
    return root


def test_runs_without_out_dir_get_their_own_directories(work, tmp_path):
    cwd = tmp_path
    data = f"+data.train.t={work / 'data'}"
    for _ in range(2):
        r = _flexmoe(cwd, "train", *SMALL, data, "trainer.steps=2")
        assert r.returncode == 0, r.stderr[-2000:]
    finals = sorted(cwd.glob("runs/*/*/final/flexmoe.json"))
    assert len(finals) == 2 and finals[0].parent.parent != finals[1].parent.parent
    # a dry run names no directory: nothing is left behind
    r = _flexmoe(cwd, "train", *SMALL, data, "--dry-run")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(list(cwd.glob("runs/*/*"))) == 2


def test_a_finished_run_is_not_trained_again(work, tmp_path):
    out = tmp_path / "run"
    data = f"+data.train.t={work / 'data'}"
    assert _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=2", f"out_dir={out}").returncode == 0
    # the public router row that `router-embed --public` attaches to final/
    r = _flexmoe(tmp_path, "router-embed", "--model", str(out / "final"), "--data", str(work / "data"), "--public",
                 "--seq-len", "32")
    assert r.returncode == 0, r.stderr[-2000:]
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=2", f"out_dir={out}")
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert f"out_dir={out}" in last and "trainer.overwrite_final=true" in last and "Traceback" not in r.stderr
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # not even Hydra's record of the refused run was written
    # asked for explicitly, final/ is replaced and keeps its public router row
    r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=3", f"out_dir={out}", "trainer.overwrite_final=true")
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((out / "final" / "flexmoe.json").read_text())
    assert meta["router_embedding"]["router_public"] == "router_public.safetensors"
    assert (out / "final" / "router_public.safetensors").read_bytes() == before[Path("final/router_public.safetensors")]
    assert meta["tokens_seen"] > json.loads(before[Path("final/flexmoe.json")])["tokens_seen"]


def test_resume_into_another_models_checkpoint_is_refused(work, tmp_path):
    out = tmp_path / "run"
    data = f"+data.train.t={work / 'data'}"
    r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=4", "trainer.stop_after=2", f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE").is_file()
    r = _flexmoe(tmp_path, "train", *[a for a in SMALL if a != "model=tiny"], "model=tiny_moe", data,
                 "trainer.steps=4", f"out_dir={out}")
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert "holds a checkpoint of another run" in last and "model.num_experts" in last and "new out_dir" in last
    assert "Traceback" not in r.stderr
    # the same settings resume
    r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=4", f"out_dir={out}")
    assert r.returncode == 0 and "resumed from" in r.stderr, r.stderr[-2000:]


def test_default_run_dir_under_schedulers(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for k in ("FLEXMOE_RUN_DIR", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    assert default_run_dir().startswith("runs/")
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert default_run_dir() == "runs/slurm-123"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="out_dir=DIR"):
        default_run_dir()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    assert default_run_dir() == "runs/torchrun-abc"


def test_final_as_shards_loads_like_one_file(work, tmp_path):
    """trainer.max_shard_size writes final/ as shards plus an index (issue 16, item 1): the same
    tensors, fingerprint and export-hf bytes as the single-file final of the same run."""
    from flexmoe.convert.hf_export import export_hf
    from flexmoe.io.model_dir import load_model_dir

    data = f"+data.train.t={work / 'data'}"
    for name, extra in (("one", []), ("sharded", ["trainer.max_shard_size=200KB"])):
        r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=2", f"out_dir={tmp_path / name}", *extra)
        assert r.returncode == 0, r.stderr[-2000:]
    one, sharded = tmp_path / "one" / "final", tmp_path / "sharded" / "final"
    shards = sorted(p.name for p in sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    meta = json.loads((sharded / "flexmoe.json").read_text())
    assert set(shards) | {"model.safetensors.index.json"} <= set(meta["files"])
    _, a, meta_a = load_model_dir(one)
    _, b, meta_b = load_model_dir(sharded)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert meta_a["fingerprint"] == meta_b["fingerprint"]
    ha, hb = export_hf(one, tmp_path / "hf-one"), export_hf(sharded, tmp_path / "hf-sharded")
    files = sorted(p.name for p in ha.iterdir() if p.suffix == ".safetensors")
    assert files == sorted(p.name for p in hb.iterdir() if p.suffix == ".safetensors")
    assert all((ha / f).read_bytes() == (hb / f).read_bytes() for f in files)
    r = _flexmoe(tmp_path, "train", *SMALL, data, "trainer.steps=2", f"out_dir={tmp_path / 'bad'}",
                 "trainer.max_shard_size=lots")
    assert r.returncode == 2 and "trainer.max_shard_size='lots'" in r.stderr and "Traceback" not in r.stderr


def test_async_checkpoints_resume_bit_identically(work, tmp_path):
    """trainer.async_save=true (issue 15, item 6): periodic checkpoints written in the background
    give the same run, and a kill while one is in flight leaves the previous one as the newest
    complete checkpoint, from which the resumed run ends bit-identical to an unbroken one."""
    from flexmoe.io.model_dir import load_model_dir
    from flexmoe.train.checkpoint import complete_checkpoints

    data = f"+data.train.t={work / 'data'}"
    common = [*SMALL, data, "trainer.steps=6", "trainer.save_every=2", "trainer.keep_last=5"]
    r = _flexmoe(tmp_path, "train", *common, f"out_dir={tmp_path / 'sync'}")
    assert r.returncode == 0, r.stderr[-2000:]
    r = _flexmoe(tmp_path, "train", *common, "trainer.async_save=true", f"out_dir={tmp_path / 'async'}",
                 env={"FLEXMOE_TEST_KILL_AT": "train-step-5"})
    assert r.returncode == -9, r.stderr[-2000:]
    # step 4 was still in flight (it counts only once seen written, at the next step): step 2 is the newest
    assert [p.name for p in complete_checkpoints(tmp_path / "async" / "checkpoints")] == ["step-00000002"]
    r = _flexmoe(tmp_path, "train", *common, "trainer.async_save=true", f"out_dir={tmp_path / 'async'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stderr and "step-00000002" in r.stderr
    _, a, _ = load_model_dir(tmp_path / "sync" / "final")
    _, b, _ = load_model_dir(tmp_path / "async" / "final")
    assert all(a[k].equal(b[k]) for k in a)
    done = [p.name for p in complete_checkpoints(tmp_path / "async" / "checkpoints")]
    assert done == ["step-00000002", "step-00000004", "step-00000006"]
