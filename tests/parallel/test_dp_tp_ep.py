"""DP-SGD under tensor and expert parallelism and HSDP on 2 gloo ranks: tp=2 (both ranks read the
same units, each holds half of every expert's d_ff, the router replicated), ep=2 (each rank reads
its own units and holds its own experts; rows travel to their expert's rank with their unit id)
and dp_replicate=2 (HSDP's replicate axis: each rank its own units, the whole model on each)
give the model, losses and epsilon of one process on the same global sample and noise seed, for
book-keeping clipping and for the one-backward-per-window reference."""

import pytest
import torch

from disthelpers import run_distributed
from flexmoe.io.model_dir import load_model_dir
from parhelpers import losses, train_on_rank
from test_dp_parallel import _dp_cfg

pytest.importorskip("opacus")

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"ep": 2}, "hsdp": {"dp_replicate": 2, "dp_shard": 1}}


def _cfg(pdata, out, world, clipping, unit="window", **parallel):
    cfg = _dp_cfg(pdata, out, world, unit)
    cfg["trainer"]["steps"], cfg["trainer"]["save_every"] = 3, 0
    cfg["privacy"]["clipping"] = clipping
    cfg["parallel"].update(parallel)
    return cfg


def _same(one, two, path_one, path_two):
    d1, d2 = one["dp"], two["dp"]
    assert d1["epsilon"] == d2["epsilon"] > 0 and d1["steps"] == d2["steps"] == 3
    assert d1["clipping"] == d2["clipping"]
    l1, l2 = losses(path_one), losses(path_two)
    assert sorted(l1) == [1, 2, 3] and all(abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]) for s in l1), (l1, l2)
    _, a, _ = load_model_dir(path_one / "final")
    _, b, _ = load_model_dir(path_two / "final")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-4, rtol=1e-4, msg=k)


@pytest.mark.parametrize("clipping,unit,names", [
    ("book_keeping", "window", ["tp2", "ep2", "hsdp"]),
    ("per_unit_backward", "window", ["tp2", "ep2", "hsdp"]),
    ("book_keeping", "document", ["ep2"]),  # a document's windows on one rank, its rows on both
])
def test_dp_under_tp_and_ep_equals_one_process(pdata, tmp_path, clipping, unit, names):
    one = run_distributed(train_on_rank, 1, [_cfg(pdata, tmp_path / "one", 1, clipping, unit)], timeout=300)[0][0]
    two = run_distributed(train_on_rank, 2, [_cfg(pdata, tmp_path / n, 2, clipping, unit, **LAYOUTS[n])
                                             for n in names], timeout=300)
    assert one["dp"]["clipping"] == clipping
    _, init, _ = load_model_dir(pdata["init"])
    _, a, _ = load_model_dir(tmp_path / "one" / "final")
    assert sum(not torch.equal(a[k], init[k]) for k in a) >= 2  # the trainable expert and router rows moved
    for i, n in enumerate(names):
        assert two[0][i]["dp"] == two[1][i]["dp"], n  # every rank reports the same record
        _same(one, two[0][i], tmp_path / "one", tmp_path / n)


def test_every_fsdp_engine_layout_accepted_deepspeed_refused(pdata, tmp_path):
    from omegaconf import OmegaConf

    from flexmoe.config.train import RunConfig
    from flexmoe.train.private_step import check_private_run

    def cfg(**parallel):
        return OmegaConf.merge(OmegaConf.structured(RunConfig), _cfg(pdata, tmp_path, 2, "auto", **parallel))

    with pytest.raises(ValueError, match="parallel.engine=deepspeed with privacy.enabled=true"):
        check_private_run(cfg(engine="deepspeed"))
    for layout in LAYOUTS.values():
        check_private_run(cfg(**layout))
