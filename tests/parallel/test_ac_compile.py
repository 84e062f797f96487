"""Activation checkpointing recomputes the same numbers (bit-identical loss); compile per block
keeps them within float noise. Both leave parameter names, so checkpoints, unchanged."""

import pytest
import torch

from flexmoe.io.model_dir import load_model_dir
from parhelpers import losses, run_cfg, train_on_rank


def _run(pdata, out, **parallel):
    train_on_rank(0, 1, [run_cfg(pdata, out, steps=3, **parallel)])
    return losses(out), load_model_dir(out / "final")[1]


@pytest.fixture(scope="module")
def plain(pdata, tmp_path_factory):
    return _run(pdata, tmp_path_factory.mktemp("plain"))


@pytest.mark.parametrize("ac", ["full", "selective"])
def test_activation_checkpointing_is_bit_identical(pdata, plain, tmp_path, ac):
    got, sd = _run(pdata, tmp_path, ac=ac, ac_every=2)
    assert got == plain[0]
    assert all(torch.equal(sd[k], plain[1][k]) for k in plain[1])


def test_compile_per_block(pdata, plain, tmp_path):
    # aot_eager traces and compiles the graphs without a C++ toolchain (inductor takes a minute on CPU)
    got, sd = _run(pdata, tmp_path, compile=True, compile_backend="aot_eager")
    assert sd.keys() == plain[1].keys()
    for s, v in plain[0].items():
        assert abs(got[s] - v) / v < 1e-5, (got, plain[0])
