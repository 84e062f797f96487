"""Issue 16: merge, branch and remove-expert stream into sharded native directories.

The streaming merge must compute exactly what the in-memory merge it replaced computed
(tests/flex/legacy_merge.py, copied before the rewrite): same tensors bit for bit, same logits,
under every routing policy, with and without `--shared average`, with a bfloat16 package (torch.stack
promotes; the stream casts chunk by chunk) and a router bias. Sharded and single-file directories
load to identical state dicts and export to identical Hugging Face directories.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from flexmoe.config.model import ROUTINGS
from flexmoe.convert.hf_export import export_hf
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.io.digests import hash_file, is_parts, mismatch, part_lengths
from flexmoe.flex.release import remove_expert
from flexmoe.io.files import sha256_file
from flexmoe.io.keys import router_bias_key
from flexmoe.io.model_dir import CheckpointError, load_model_dir, save_model_dir
from flexmoe.io.native import open_native
from flexmoe.model import Transformer
from flexmoe.train.load import load_model
from helpers import TINY, make_packages, make_public, random_profile
from legacy_merge import legacy_merge


def _sft_package(root, public, domain):
    """A BAR-style package: shared tensors trained (shipped), a negative router bias, an n-gram profile."""
    g = torch.Generator().manual_seed(7)
    anchor = branch(public, root / f"anchor-{domain}", torch.randn(TINY.num_layers, TINY.d_model, generator=g),
                    router_bias=True, owner_ngram=random_profile(11))
    cfg, sd, meta = load_model_dir(anchor)
    sd["embed.weight"] = sd["embed.weight"] + 0.3
    sd["layers.1.attn.q_proj.weight"] = sd["layers.1.attn.q_proj.weight"] * 1.1
    for k, v in sd.items():
        if ".ffn.experts." in k:
            v[1] += 0.05 * torch.randn(v[1].shape, generator=g)
    sd[router_bias_key(0)][1] = -0.5
    trained = save_model_dir(root / f"trained-{domain}", cfg, sd, dict(meta, stage="sft"))
    return make_package(trained, root / f"pkg-{domain}", owner=f"owner-{domain}", domain=domain)


def _to_bf16(pkg):
    """The package's expert weights in bfloat16 (an owner who trained in bf16), sha256 rewritten."""
    t = load_file(str(pkg / "expert.safetensors"))
    save_file({k: v.bfloat16() if k.endswith("_proj") else v for k, v in t.items()}, str(pkg / "expert.safetensors"))
    m = json.loads((pkg / "manifest.json").read_text())
    m["files"]["expert.safetensors"] = sha256_file(pkg / "expert.safetensors")
    (pkg / "manifest.json").write_text(json.dumps(m))
    return pkg


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    public = make_public(root)
    code, math_ = make_packages(root, public, ["code", "math"], ngram=True)
    return {"root": root, "public": public, "pkgs": [code, _to_bf16(math_), _sft_package(root, public, "chat")]}


def _logits(cfg, sd):
    model = Transformer(cfg)
    model.load_state_dict(sd)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model.eval()(tokens).logits


@pytest.mark.parametrize("shared", ["public", "average"])
@pytest.mark.parametrize("routing", ROUTINGS)
def test_streaming_merge_equals_in_memory_merge(world, tmp_path, monkeypatch, routing, shared):
    import flexmoe.flex.merge as merge_module
    import flexmoe.io.writer as writer

    # Tiny read chunks, so every tensor (and the chunked average) spans many pieces; every piece's
    # hashes and checks run on the worker threads (load_model_dir recomputes them all).
    monkeypatch.setattr(merge_module, "CHUNK", 64)
    monkeypatch.setattr(writer, "PARALLEL_MIN", 0)
    rows = "centred_norm" if routing == "topk" else "raw"
    out = merge(world["public"], world["pkgs"], tmp_path / "m", routing=routing, shared=shared, router_rows=rows,
                max_shard_size="40KB" if shared == "average" else None)
    cfg, sd, meta = load_model_dir(out)
    want_cfg, want = legacy_merge(world["public"], world["pkgs"], routing=routing, shared=shared, router_rows=rows)
    assert cfg == want_cfg
    assert sorted(sd) == sorted(want)
    assert [k for k in sd if sd[k].dtype != want[k].dtype or not torch.equal(sd[k], want[k])] == []
    assert torch.equal(_logits(cfg, sd), _logits(want_cfg, want))
    assert sd["layers.0.ffn.experts.up_proj"].dtype == torch.float32  # the bf16 package was promoted
    div = meta["shared_divergence"]
    assert div["embed.weight"]["owner-chat"] > 0.01 and div["norm.weight"]["owner-chat"] == 0.0


def test_sharded_and_single_file_are_the_same_model(world, tmp_path, monkeypatch):
    import flexmoe.io.writer as writer

    monkeypatch.setattr(writer, "PARALLEL_MIN", 0)
    pkgs = world["pkgs"][:2]  # no router bias: export-hf refuses one
    one = merge(world["public"], pkgs, tmp_path / "one", routing="topk")
    many = merge(world["public"], pkgs, tmp_path / "many", routing="topk", max_shard_size="16KB")
    shards = sorted(p.name for p in many.glob("model-*.safetensors"))
    assert len(shards) >= 5 and not (many / "model.safetensors").exists()
    meta = json.loads((many / "flexmoe.json").read_text())
    assert set(meta["files"]) == {*shards, "model.safetensors.index.json", "config.json"}
    assert all(mismatch(many / n, d, hash_file(many / n, part_lengths(d)), "") is None for n, d in meta["files"].items())
    assert all(is_parts(meta["files"][n]) for n in shards)  # weights are recorded by parts (io.digests)
    (c1, a, m1), (c2, b, m2) = load_model_dir(one), load_model_dir(many)
    assert c1 == c2 and sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert [e["tensor_sha256"] for e in m1["experts"]] == [e["tensor_sha256"] for e in m2["experts"]]
    model, _, _ = load_model(many)  # train/load.load_model reads shards too
    assert torch.equal(_logits(c1, a), _logits(c2, model.state_dict()))
    # export-hf of either is the same directory, byte for byte
    h1, h2 = export_hf(one, tmp_path / "hf1", max_shard_size="30KB"), export_hf(many, tmp_path / "hf2", max_shard_size="30KB")
    files = sorted(p.relative_to(h1).as_posix() for p in h1.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(h2).as_posix() for p in h2.rglob("*") if p.is_file()) and len(files) > 4
    assert [f for f in files if (h1 / f).read_bytes() != (h2 / f).read_bytes()] == []
    # remove-expert and branch read and write shards as well
    r1 = remove_expert(one, tmp_path / "r1", "math")
    r2 = remove_expert(many, tmp_path / "r2", "math", max_shard_size="20KB")
    (_, x, _), (_, y, _) = load_model_dir(r1), load_model_dir(r2)
    assert len(list(r2.glob("model-*"))) > 2 and all(torch.equal(x[k], y[k]) for k in x) and sorted(x) == sorted(y)
    b1, b2 = branch(world["public"], tmp_path / "b1"), branch(world["public"], tmp_path / "b2", max_shard_size="10KB")
    (_, x, _), (_, y, _) = load_model_dir(b1), load_model_dir(b2)
    assert len(list(b2.glob("model-*"))) > 2 and sorted(x) == sorted(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_save_model_dir_writes_shards_for_the_trainer(tmp_path):
    cfg, sd, meta = load_model_dir(make_public(tmp_path))
    out = save_model_dir(tmp_path / "final", cfg, sd, {"kind": "public", "fingerprint": meta["fingerprint"]},
                         max_shard_size="8KB")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*"))) > 3
    _, back, _ = load_model_dir(out)
    assert all(torch.equal(back[k], sd[k]) for k in sd) and sorted(back) == sorted(sd)
    _, lazy, _ = open_native(out)
    assert sorted(lazy) == sorted(sd)


def _sharded(world, tmp_path):
    return merge(world["public"], world["pkgs"][:1], tmp_path / "m", routing="topk", max_shard_size="16KB")


def _rehash_index(m):
    meta = json.loads((m / "flexmoe.json").read_text())
    meta["files"]["model.safetensors.index.json"] = sha256_file(m / "model.safetensors.index.json")
    (m / "flexmoe.json").write_text(json.dumps(meta))


def _move_key(m):
    index = json.loads((m / "model.safetensors.index.json").read_text())
    key = sorted(index["weight_map"])[0]
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})
    index["weight_map"][key] = others[0]
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    _rehash_index(m)


def _drop_key(m):
    index = json.loads((m / "model.safetensors.index.json").read_text())
    index["weight_map"].pop(sorted(index["weight_map"])[0])
    (m / "model.safetensors.index.json").write_text(json.dumps(index))
    _rehash_index(m)


def _stale_single(m):
    (m / "model.safetensors").write_bytes((m / "model-00001-of-00010.safetensors").read_bytes())


def _unlisted_shard(m):
    meta = json.loads((m / "flexmoe.json").read_text())
    meta["files"].pop("model-00002-of-00010.safetensors")
    (m / "flexmoe.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("mutate,text", [(_move_key, "lacks tensor"), (_drop_key, "has no entry"),
                                         (_stale_single, "both"), (_unlisted_shard, "does not list"),
                                         (lambda m: (m / "model-00003-of-00010.safetensors").unlink(), "missing")])
def test_index_and_listing_are_checked(world, tmp_path, mutate, text):
    m = _sharded(world, tmp_path)
    assert len(list(m.glob("model-*"))) == 10
    mutate(m)
    for read in (load_model_dir, open_native):
        with pytest.raises(CheckpointError, match=text):
            read(m)
