"""The bad-input harness: run a `flexmoe` command as a user would and check how it refuses.

`run_cli` runs the command in this process (fast: no interpreter or torch start-up per case);
`run_cli_subprocess` runs `python -m flexmoe.cli` for what needs a fresh process (Hydra's
`flexmoe train`, real exit codes). `assert_refused` is what every case checks: exit code 2, no
traceback, the last line of stderr names the file or setting at fault, and the destination was
not created (or left as it was).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

CANARY_ENV = "FLEXMOE_PICKLE_CANARY"


@dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = [x for x in self.err.strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""


def _run_in_process(argv: list[str]) -> Result:
    from flexmoe.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse usage errors exit through SystemExit
            rc = e.code if isinstance(e.code, int) else 1
    return Result(rc, out.getvalue(), err.getvalue())


@pytest.fixture
def run_cli():
    """Run `flexmoe ARGV` in this process; an uncaught exception fails the test with its traceback."""
    return _run_in_process


@pytest.fixture
def run_cli_subprocess(tmp_path):
    """Run `python -m flexmoe.cli ARGV` in a fresh process (cwd: a temp dir)."""
    def run(argv: list[str], timeout: int = 120, cwd: Path | None = None) -> Result:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("FLEXMOE_DEBUG", None)
        r = subprocess.run([sys.executable, "-m", "flexmoe.cli", *map(str, argv)], capture_output=True, text=True,
                           timeout=timeout, cwd=cwd or tmp_path, env=env)
        return Result(r.returncode, r.stdout, r.stderr)
    return run


def snapshot(path: Path) -> dict[str, bytes] | None:
    """Every file under `path` with its bytes (None when `path` does not exist)."""
    path = Path(path)
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def assert_refused(r: Result, names: str | list[str], dest: Path | None = None, before=None) -> None:
    """Exit 2, no traceback, stderr's last line names one of `names`, and `dest` untouched:
    absent when `before` is None, else equal to the `snapshot` taken before the command."""
    assert r.rc == 2, f"exit code {r.rc}, stderr:\n{r.err[-2000:]}"
    assert "Traceback" not in r.err, r.err[-3000:]
    names = [names] if isinstance(names, str) else names
    assert any(str(n) in r.last_line for n in names), f"last line {r.last_line!r} names none of {names}"
    if dest is not None:
        assert snapshot(dest) == before, f"{dest} was written or changed"
        leftovers = [p.name for p in Path(dest).parent.glob(f".{Path(dest).name}.*")] if Path(dest).parent.exists() else []
        assert not leftovers, f"temporary files left beside {dest}: {leftovers}"


# Test modules import the helpers above as `from security_harness import assert_refused, snapshot`:
# every test folder has a `conftest`, so `from conftest import ...` gets whichever was loaded last
# when several folders run in one session.
sys.modules.setdefault("security_harness", sys.modules[__name__])
