"""Freeze plans per stage: after real training steps, exactly the named groups changed and every
other tensor is bit-identical."""

import sysconfig
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from flexmoe.config import ModelConfig
from flexmoe.config.train import RunConfig
from flexmoe.io.model_dir import load_model_dir
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.flex.branch import branch
from flexmoe.train.trainer import train
from helpers import make_public

CFG = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=48)
ALL = {"embeddings", "norms", "attention", "anchor_expert", "owner_expert", "public_router_row", "owner_router_row"}
EXPECTED = {
    "expert_anchor": {"owner_expert", "owner_router_row"},
    "midtrain": {"owner_expert", "owner_router_row"},
    "sft": {"owner_expert", "owner_router_row", "embeddings"},
    "rl_unfrozen": ALL - {"anchor_expert", "public_router_row"},
    "router_tune": {"public_router_row", "owner_router_row"},
    "none": ALL,
}


def _group_changes(before, after):
    changed = set()
    for k, v in before.items():
        a = after[k]
        if ".ffn.experts." in k:
            changed |= {"anchor_expert"} if not torch.equal(a[0], v[0]) else set()
            changed |= {"owner_expert"} if not torch.equal(a[1], v[1]) else set()
        elif ".ffn.router." in k:
            changed |= {"public_router_row"} if not torch.equal(a[0], v[0]) else set()
            changed |= {"owner_router_row"} if not torch.equal(a[1], v[1]) else set()
        elif not torch.equal(a, v):
            changed.add("embeddings" if k.startswith(("embed", "lm_head")) else "attention" if ".attn." in k
                        else "norms" if k.endswith("norm.weight") else k)
    return changed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("freeze")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[d-e]*.py"))[:4]
    prepare_data(files, root / "data", ByteTokenizer(), progress=False)
    public = make_public(root, CFG)
    rows = torch.randn(CFG.num_layers, CFG.d_model, generator=torch.Generator().manual_seed(3))
    return root, branch(public, root / "anchor", rows)


@pytest.mark.parametrize("stage", sorted(EXPECTED))
def test_stage_changes_exactly_its_groups(setup, stage, tmp_path):
    root, anchor = setup
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir, cfg.init_from = str(tmp_path / "run"), str(anchor)
    cfg.stage.name, cfg.stage.freeze = stage, stage
    cfg.data.train = {"code": str(root / "data")}
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.trainer.update(steps=3, log_every=3, threads=1)
    cfg.optim.update(lr=1e-2, warmup_steps=1, weight_decay=0.1)
    res = train(cfg)
    _, before, _ = load_model_dir(anchor)
    _, after, _ = load_model_dir(res["final"])
    assert _group_changes(before, after) == EXPECTED[stage]
    # the trainer logged the plan's trainable parameters per group, and those are the groups that moved
    import json

    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["freeze_plan"] == stage
    logged = {g for g, n in first["trainable_params"].items() if n > 0 and g != "total"}
    moved = {"experts" if g.endswith("expert") else "router" if g.endswith("router_row") else g
             for g in EXPECTED[stage]}
    assert logged == moved, (logged, moved)
