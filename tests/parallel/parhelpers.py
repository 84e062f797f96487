"""Shared fixtures for the distributed tests: a tiny byte-level corpus, a 4-expert model to
start from, and run configs. Every test compares against single-process training on the same
global batch, so the per-rank batch is GLOBAL_BATCH // data-parallel size."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexmoe.config import ModelConfig
from flexmoe.config.train import RunConfig
from flexmoe.io.model_dir import save_model_dir
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.model import Transformer

GLOBAL_BATCH = 8
# 4 heads over 2 kv heads: tp=2 splits both; 4 experts: ep=2 holds 2 each (or, with the anchor
# frozen and replicated, the 3 trainable ones split 2 + 1).
MODEL = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64,
                    num_experts=4, top_k=2)


def make_pdata(root: Path) -> dict[str, Path]:
    """A tiny corpus and the 4-expert model every run starts from."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:6]
    prepare_data(files, root / "train", ByteTokenizer(), progress=False)
    torch.manual_seed(0)
    model = Transformer(MODEL)
    model.reset_parameters(seed=0)
    init = save_model_dir(root / "init", MODEL, model.state_dict(), {"kind": "moe"})
    return {"train": root / "train", "init": init}


def run_cfg(pdata, out: Path, *, world: int = 1, freeze: str = "none", steps: int = 5, seq_len: int = 32,
            **parallel) -> dict:
    """A RunConfig as a plain dict (it crosses into forked ranks) for `world` processes."""
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir, cfg.init_from = str(out), str(pdata["init"])
    cfg.data.train = {"code": str(pdata["train"])}
    dp = world // parallel.get("tp", 1)
    cfg.data.update(seq_len=seq_len, batch_size=GLOBAL_BATCH // dp)
    cfg.trainer.update(steps=steps, log_every=1, threads=1)
    cfg.optim.update(lr=3e-3, warmup_steps=2)
    cfg.stage.update(freeze=freeze, name=freeze)
    for k, v in parallel.items():
        cfg.parallel[k] = v
    return OmegaConf.to_container(cfg)


def train_on_rank(rank: int, world_size: int, cfgs: list[dict]) -> list[dict]:
    """Rank body for run_distributed: train each config in turn (one spawn, several runs)."""
    from flexmoe.train.trainer import train

    return [train(OmegaConf.merge(OmegaConf.structured(RunConfig), c)) for c in cfgs]


def losses(out: Path) -> dict[int, float]:
    """step -> logged loss; a resumed run's later record for a step wins."""
    recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}
