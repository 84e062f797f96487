"""Outputs honour the umask: a model, package or data directory handed to a colleague is readable
(directories 0755 and files 0644 under the usual 022), not 0700/0600 from mkdtemp/mkstemp."""

from __future__ import annotations

import os
import stat

import pytest

from flexmoe.io.files import atomic_output_dir, atomic_write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_outputs_honour_the_umask(tmp_path, umask_022):
    with atomic_output_dir(tmp_path / "model") as tmp:
        (tmp / "weights.bin").write_bytes(b"x")
        atomic_write_json(tmp / "meta.json", {"a": 1})
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "model" / "meta.json").stat().st_mode) == 0o644


def test_prepare_data_output_is_shareable(tmp_path, umask_022):
    from flexmoe.cli import main

    (tmp_path / "t.txt").write_text("hello world " * 50)
    assert main(["prepare-data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "data")]) == 0
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o755
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "data").iterdir() if p.is_file()}
    assert modes == {0o644}, modes
