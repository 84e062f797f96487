"""Issue 16: `flexmoe merge` plans, copies and stacks router rows without importing torch (2-3 s of
CPU on the 2-core VM, about half of a 2 GB merge). What replaces torch there must give torch's
bytes: safetensors dtypes by name (io.dtypes), `.float()` of small tensors in numpy, NaN/Inf checks
on raw bits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexmoe.flex.merge import merge
from flexmoe.io.dtypes import ITEMSIZE, float32_array, name_of, nonfinite, text
from flexmoe.io.files import sha256_file
from flexmoe.io.keys import package_router_key
from flexmoe.io.stream import read_header
from helpers import make_packages, make_public

FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _values(dtype: torch.dtype) -> torch.Tensor:
    """Normal, subnormal, signed-zero and extreme values of `dtype`."""
    info = torch.finfo(dtype)
    base = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.14159, 1e-3, 65504.0, -1e4], dtype=torch.float64)
    special = torch.tensor([info.tiny, info.tiny / 4, info.max, info.min, info.eps], dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    values = torch.cat([base, special, torch.randn(500, generator=g, dtype=torch.float64) * 40])
    return values.clamp(info.min, info.max).to(dtype)  # finite: 65504 would round to inf in float8


@pytest.mark.parametrize("name", list(FLOATS))
def test_float32_array_is_torchs_float(name):
    t = _values(FLOATS[name])
    data = t.view(torch.uint8).numpy().tobytes()
    got = float32_array(data, name, (len(t),))
    want = t.float().numpy()
    assert got.dtype.str == "<f4" and got.tobytes() == want.tobytes()  # bit for bit, -0.0 and subnormals too


@pytest.mark.parametrize("name", list(FLOATS))
def test_nonfinite_finds_what_torch_finds(name):
    dtype = FLOATS[name]
    clean = _values(dtype)
    assert not nonfinite(clean.view(torch.uint8).numpy().tobytes(), name)
    for bad in (float("nan"), float("inf"), float("-inf")):
        if bad != bad or name != "F8_E4M3":  # e4m3fn has no infinity (it saturates to max)
            t = clean.clone()
            t[217] = bad
            assert not bool(torch.isfinite(t.float()).all())
            assert nonfinite(t.view(torch.uint8).numpy().tobytes(), name), (name, bad)


def test_dtype_names_and_text_agree_with_torch():
    for name, dtype in FLOATS.items():
        assert name_of(dtype) == name and ITEMSIZE[name] == dtype.itemsize
        assert text(torch.zeros(1, dtype=dtype)) == str(dtype)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("notorch")
    public = make_public(root)
    return {"public": public, "pkgs": make_packages(root, public, ["code", "math"], ngram=True)}


def _merge_cli(world, out: Path, *extra: str, pkgs=None) -> subprocess.CompletedProcess:
    code = ("import sys\nfrom flexmoe.commands.merge import main\nrc = main(sys.argv[1:])\n"
            "print('torch imported' if 'torch' in sys.modules else 'no torch', rc)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", code, str(world["public"]), *map(str, pkgs or world["pkgs"]), "--out",
                           str(out), "--max-shard-size", "60KB", "--quiet", *extra], capture_output=True, text=True,
                          env=env)


def _written(d: Path) -> dict[str, str]:
    return {n: sha256_file(d / n) for n in sorted(os.listdir(d))}


@pytest.mark.parametrize("extra", [(), ("--routing", "topk"), ("--norm-topk-prob", "--top-k", "1")])
def test_cli_merge_imports_no_torch_and_writes_the_library_merge(world, tmp_path, extra):
    got = _merge_cli(world, tmp_path / "cli", *extra)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["no", "torch", "0"]
    kw = {"routing": "topk"} if "topk" in extra else {}
    if "--top-k" in extra:
        kw.update(top_k=1, norm_topk_prob=True)
    merge(world["public"], world["pkgs"], tmp_path / "lib", max_shard_size="60KB", **kw)  # this process has torch
    assert _written(tmp_path / "cli") == _written(tmp_path / "lib")
    assert len([n for n in os.listdir(tmp_path / "lib") if n.endswith(".safetensors")]) > 1


def test_row_rescaling_brings_torch_in_and_matches_the_library(world, tmp_path):
    got = _merge_cli(world, tmp_path / "cli", "--router-rows", "centred_norm")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["torch", "imported", "0"]  # the rescaling computes in torch
    merge(world["public"], world["pkgs"], tmp_path / "lib", max_shard_size="60KB", router_rows="centred_norm")
    assert _written(tmp_path / "cli") == _written(tmp_path / "lib")
    meta = json.loads((tmp_path / "cli" / "flexmoe.json").read_text())
    assert meta["experts"][1]["domain"] == "code"


def test_a_nan_router_row_is_refused_without_torch(world, tmp_path):
    bad = tmp_path / "pkg"
    bad.mkdir()
    for f in world["pkgs"][0].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    t = read_header(bad / "expert.safetensors")[0][package_router_key(1)]
    nan = torch.tensor([float("nan")], dtype=t.dtype).view(torch.uint8).numpy().tobytes()
    data = bytearray((bad / "expert.safetensors").read_bytes())
    data[t.spans[0].start:t.spans[0].start + len(nan)] = nan
    (bad / "expert.safetensors").write_bytes(bytes(data))
    got = _merge_cli(world, tmp_path / "out", "--no-verify", pkgs=[bad, world["pkgs"][1]])
    assert got.returncode != 0 and not (tmp_path / "out").exists()
    assert f"{package_router_key(1)} holds NaN or Inf values" in got.stderr
