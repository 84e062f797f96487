"""The README's lifecycle block runs as written (issue 18): extracted from README.md, run by bash in
a fresh directory with text from this machine's standard library, at tiny size (a shell function
adds `model=tiny trainer.steps=3 ...` to each `flexmoe train`; every other command is unchanged)."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = "model=tiny trainer.steps=3 data.seq_len=32 data.batch_size=2 trainer.log_every=1 trainer.threads=1"


def lifecycle_block() -> str:
    """The first ```bash block after the `<!-- lifecycle-commands -->` marker."""
    text = README.read_text()
    m = re.search(r"<!-- lifecycle-commands -->\s*```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no lifecycle-commands block"
    return m.group(1)


def _inputs(root: Path) -> None:
    """public_texts/, code_texts/ (stdlib sources) and math_texts/ (generated sums) as .txt files."""
    std = Path(sysconfig.get_paths()["stdlib"])
    for name, files in (("public_texts", sorted(std.glob("[d-f]*.py"))[:6]),
                        ("code_texts", sorted(std.glob("[a-c]*.py"))[:6])):
        (root / name).mkdir()
        for f in files:
            (root / name / (f.stem + ".txt")).write_text(f.read_text(encoding="utf-8", errors="replace"))
    r = random.Random(0)
    (root / "math_texts").mkdir()
    (root / "math_texts" / "sums.txt").write_text(
        "".join(f"{a} + {b} = {a + b}\n" for a, b in ((r.randint(0, 999), r.randint(0, 999)) for _ in range(3000))))


@pytest.mark.slow
def test_readme_lifecycle_block_runs_as_written(tmp_path):
    flexmoe = shutil.which("flexmoe", path=str(Path(sys.executable).parent))
    assert flexmoe, "the flexmoe console script is not installed next to this python"
    _inputs(tmp_path)
    shim = (f'flexmoe() {{ if [ "$1" = train ]; then "{flexmoe}" "$@" {TINY}; else "{flexmoe}" "$@"; fi; }}\n'
            "set -euo pipefail\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", shim + lifecycle_block()], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # what the block says it makes, each checked by the tool that reads it
    for d in ("math", "code"):
        manifest = json.loads((tmp_path / f"pkg-{d}" / "manifest.json").read_text())
        assert manifest["owner"] == f"owner-{d}" and manifest["domain"] == d
    merged = json.loads((tmp_path / "merged" / "flexmoe.json").read_text())
    release = json.loads((tmp_path / "release" / "flexmoe.json").read_text())
    assert len(merged["experts"]) == 3 and len(release["experts"]) == 2
    assert json.loads((tmp_path / "release-hf" / "config.json").read_text())["num_experts"] == 2
    card = (tmp_path / "release-hf" / "README.md").read_text()
    assert card.startswith("---\n") and "owner-code" in card and "owner-math" in card  # math: listed as removed
    # eval printed JSON with the model and soup rows for both domains
    ev = json.loads(r.stdout[r.stdout.index('{\n "perplexity"'):].split("\n}\n")[0] + "\n}")
    assert set(ev["perplexity"]["model"]) == {"math", "code"}
