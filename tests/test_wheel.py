"""A normal, non-editable install trains: the wheel carries the Hydra config tree, and the CLI
runs from another directory with nothing of the source tree on its path."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, env, timeout=300):
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{args}:\n{r.stdout[-1500:]}\n{r.stderr[-3000:]}"
    return r


def test_wheel_install_trains_from_another_directory(tmp_path):
    wheels, site, work = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
          str(ROOT)], cwd=tmp_path, env=env)
    wheel = next(wheels.glob("flexmoe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "flexmoe/conf/train.yaml" in names and "flexmoe/conf/model/tiny.yaml" in names
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
         cwd=tmp_path, env=env)
    # The installed copy comes first on the path; the editable checkout's src/ is not used.
    env = dict(env, PYTHONPATH=str(site))
    env.pop("FLEXMOE_CONF", None)
    where = _run([sys.executable, "-c", "import flexmoe; print(flexmoe.__file__)"], cwd=work, env=env)
    assert where.stdout.strip().startswith(str(site)), where.stdout
    cli = [sys.executable, "-m", "flexmoe.cli"]
    assert _run(cli + ["--version"], cwd=work, env=env).stdout.startswith("flexmoe 0.")
    dry = _run(cli + ["train", "model=tiny", "--dry-run"], cwd=work, env=env)
    assert "parameters: total" in dry.stdout
    (work / "text.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    _run(cli + ["prepare-data", "text.txt", "--out", "data"], cwd=work, env=env)
    out = _run(cli + ["train", "model=tiny", "out_dir=run", "+data.train.text=data", "data.seq_len=32",
                      "data.batch_size=4", "trainer.steps=3", "trainer.log_every=1"], cwd=work, env=env)
    assert (work / "run" / "final" / "flexmoe.json").is_file(), out.stderr[-2000:]
