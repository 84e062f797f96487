"""Router tuning on a proxy sample: only router rows move; every expert and shared tensor stays
bit-identical.

Not shown here: that tuning *improves* the merge. In this toy the untuned merge already matches
each expert on its own domain (seen: math 3.361 merged vs 3.361 expert), so there is nothing to
recover; the test asserts that tuning does no harm (within 1%)."""

import random
import sysconfig
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from flexmoe.config.train import RunConfig
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir
from flexmoe.data import ByteTokenizer, TokenWindows, prepare_data
from flexmoe.data.proxy import sample_proxy
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.flex.router_init import attach_public_embedding, compute_router_embedding
from flexmoe.train.trainer import evaluate_loss, train


def _cfg(out, train_dirs, steps, lr, **kw):
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir = str(out)
    cfg.model.update(vocab_size=258, d_model=48, num_layers=2, num_heads=4, d_ff=96)
    cfg.data.train = {k: str(v) for k, v in train_dirs.items()}
    cfg.data.update(seq_len=64, batch_size=8)
    cfg.trainer.update(steps=steps, log_every=steps, threads=1)
    cfg.optim.update(lr=lr, warmup_steps=2)
    for k, v in kw.items():
        OmegaConf.update(cfg, k, v, merge=False)
    return cfg


def test_router_tuning_moves_only_router_rows(tmp_path):
    tok = ByteTokenizer()
    std = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[f-h]*.py"))
    rng = random.Random(0)
    math_lines = [f"{a} * {b} = {a * b}" for a, b in ((rng.randint(2, 99), rng.randint(2, 99)) for _ in range(4000))]
    (tmp_path / "math.txt").write_text("\n".join(math_lines[:3600]))
    (tmp_path / "math_val.txt").write_text("\n".join(math_lines[3600:]))
    d = {}
    d["public"] = prepare_data(std[:6], tmp_path / "public", tok, progress=False) and tmp_path / "public"
    d["code"] = prepare_data(std[6:12], tmp_path / "code", tok, progress=False) and tmp_path / "code"
    d["code_val"] = prepare_data(std[12:14], tmp_path / "code_val", tok, progress=False) and tmp_path / "code_val"
    d["math"] = prepare_data([tmp_path / "math.txt"], tmp_path / "m", tok, progress=False) and tmp_path / "m"
    d["math_val"] = prepare_data([tmp_path / "math_val.txt"], tmp_path / "mv", tok, progress=False) and tmp_path / "mv"

    public = Path(train(_cfg(tmp_path / "pub", {"public": d["public"]}, 80, 3e-3))["final"])
    compute_router_embedding(public, d["public"], tmp_path / "pub_rows.safetensors", seq_len=64, num_windows=32)
    attach_public_embedding(public, tmp_path / "pub_rows.safetensors")
    pkgs = []
    for dom in ("code", "math"):
        rows = compute_router_embedding(public, d[dom], tmp_path / f"{dom}_rows.safetensors", seq_len=64,
                                        num_windows=32)
        anchor = branch(public, tmp_path / f"anchor-{dom}", rows)
        res = train(_cfg(tmp_path / f"exp-{dom}", {dom: d[dom], "public": d["public"]}, 40, 3e-3,
                         init_from=str(anchor), **{"stage.freeze": "expert_anchor", "stage.public_mix": 0.25}))
        pkgs.append(make_package(res["final"], tmp_path / f"pkg-{dom}", owner=dom, domain=dom))
    merged = merge(public, pkgs, tmp_path / "merged", top_k=2)

    proxy = {dom: tmp_path / f"proxy-{dom}" for dom in ("code", "math")}
    for dom, out in proxy.items():
        sample_proxy(d[dom], out, fraction=0.1, seq_len=64)
    tuned = train(_cfg(tmp_path / "tune", proxy, 30, 1e-2, init_from=str(merged),
                       **{"stage.freeze": "router_tune", "stage.name": "router_tune"}))

    val = {"code": TokenWindows(d["code_val"], 64), "math": TokenWindows(d["math_val"], 64)}
    before_model, _, _ = load_model(merged)
    after_model, _, _ = load_model(tuned["final"])
    before = np.mean([evaluate_loss(before_model, w, 8, 8) for w in val.values()])
    after = np.mean([evaluate_loss(after_model, w, 8, 8) for w in val.values()])
    print(f"mean val loss over expert domains: untuned {before:.4f}, router-tuned {after:.4f}")
    assert after < before * 1.01, (before, after)

    _, a, _ = load_model_dir(merged)
    _, b, _ = load_model_dir(tuned["final"])
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(".ffn.router." in k for k in moved), moved
