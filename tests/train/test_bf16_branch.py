"""Branch from a bf16 public model, train the expert, package, merge: every step succeeds, the
anchor and shared tensors stay bit-identical bf16, and the fingerprint matches (the trainer keeps
frozen tensors in their stored dtype and writes every tensor back in it)."""

import sysconfig
from pathlib import Path

import torch
from omegaconf import OmegaConf

from flexmoe.config import ModelConfig
from flexmoe.config.train import RunConfig
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.io.fingerprint import fingerprint
from flexmoe.io.keys import dense_ffn_key, experts_key, is_shared_key
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.model import Transformer
from flexmoe.train.trainer import train

DENSE = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)


def test_bf16_public_branch_train_package_merge(tmp_path):
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:4]
    prepare_data(files, tmp_path / "data", ByteTokenizer(), progress=False)
    model = Transformer(DENSE)
    model.reset_parameters(seed=3)
    sd = {k: v.bfloat16() for k, v in model.state_dict().items()}  # a public model as released: bf16
    public = save_model_dir(tmp_path / "public", DENSE, sd, {"kind": "public", "fingerprint": fingerprint(sd)})
    anchor = branch(public, tmp_path / "anchor")

    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir, cfg.init_from = str(tmp_path / "run"), str(anchor)
    cfg.data.train = {"code": str(tmp_path / "data")}
    cfg.data.update(seq_len=32, batch_size=4)
    cfg.trainer.update(steps=3, log_every=1, threads=1)
    cfg.optim.update(lr=3e-3, warmup_steps=1)
    cfg.stage.update(freeze="expert_anchor", name="expert_anchor")
    res = train(cfg)

    _, pub, pub_meta = load_model_dir(public)
    _, final, meta = load_model_dir(res["final"])
    assert meta["shared_unchanged"] is True and meta["base_fingerprint"] == pub_meta["fingerprint"] == fingerprint(final)
    for k, v in pub.items():
        if is_shared_key(k):
            assert final[k].dtype == torch.bfloat16 and torch.equal(final[k], v), f"shared {k} moved"
    for i in range(DENSE.num_layers):
        for w in ("gate_proj", "up_proj", "down_proj"):
            e = final[experts_key(i, w)]
            assert e.dtype == torch.bfloat16, "a canonical [E, ...] expert tensor has one dtype, the stored one"
            assert torch.equal(e[0], pub[dense_ffn_key(i, w)]), f"anchor slot of layer {i} {w} moved"
            assert not torch.equal(e[1], pub[dense_ffn_key(i, w)]), f"expert 1 of layer {i} {w} did not train"

    pkg = make_package(res["final"], tmp_path / "pkg", owner="acme", domain="code")  # refuses moved tensors
    merged = merge(public, [pkg], tmp_path / "merged")
    _, msd, _ = load_model_dir(merged)
    for k, v in pub.items():
        if is_shared_key(k):
            assert torch.equal(msd[k], v), k
    for i in range(DENSE.num_layers):
        for w in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(msd[experts_key(i, w)][0], pub[dense_ffn_key(i, w)])
            assert torch.equal(msd[experts_key(i, w)][1], final[experts_key(i, w)][1])
