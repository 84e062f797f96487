"""trainer.dtype=auto (issue 15, point 8): bf16 autocast on CPUs with AMX or AVX512-BF16, fp32 on
AVX2-only CPUs (where bf16 is ~90x slower), fp32 for DP training, and the env override."""

import pytest
import torch

from flexmoe.config.train import RunConfig, as_run_config
from flexmoe.train import hardware


def _cfg(**trainer):
    from omegaconf import OmegaConf

    c = OmegaConf.structured(RunConfig)
    c.trainer.dtype = "auto"
    return as_run_config(c)


@pytest.mark.parametrize("flags,want", [({"avx2", "amx_bf16", "amx_tile"}, "bf16"), ({"avx2", "avx512_bf16"}, "bf16"),
                                        ({"avx2", "avx512f"}, "fp32")])
def test_auto_follows_the_cpu(monkeypatch, flags, want):
    monkeypatch.delenv(hardware.AUTO_DTYPE_ENV, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert hardware.resolve_dtype(_cfg(), torch.device("cpu")).trainer.dtype == want


def test_auto_is_fp32_under_dp_and_overridable(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"amx_bf16"}))
    monkeypatch.delenv(hardware.AUTO_DTYPE_ENV, raising=False)
    cfg = _cfg()
    dp = cfg.__class__(**{**cfg.__dict__, "privacy": cfg.privacy.__class__(**{**cfg.privacy.__dict__, "enabled": True,
                                                                                 "noise_multiplier": 1.0})})
    assert hardware.resolve_dtype(dp, torch.device("cpu")).trainer.dtype == "fp32"
    monkeypatch.setenv(hardware.AUTO_DTYPE_ENV, "fp32")
    assert hardware.resolve_dtype(cfg, torch.device("cpu")).trainer.dtype == "fp32"
    monkeypatch.setenv(hardware.AUTO_DTYPE_ENV, "fp16")
    with pytest.raises(ValueError, match="FLEXMOE_AUTO_DTYPE"):
        hardware.resolve_dtype(cfg, torch.device("cpu"))
    explicit = cfg.__class__(**{**cfg.__dict__, "trainer": cfg.trainer.__class__(**{**cfg.trainer.__dict__, "dtype": "fp32"})})
    assert hardware.resolve_dtype(explicit, torch.device("cpu")) is explicit


def test_cli_default_is_auto(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "flexmoe.cli", "train", "--cfg", "job"], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dtype: auto" in r.stdout
