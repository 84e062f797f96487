"""Branch equivalence, opt-out exactness and merge refusals."""

import json
import shutil

import pytest
import torch

from flexmoe.cli import main as cli_main
from flexmoe.io.model_dir import CheckpointError, load_model_dir
from flexmoe.train.load import load_model
from flexmoe.flex.branch import branch
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from helpers import TINY, make_packages, make_public


def _tokens(seed=0, shape=(3, 20)):
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def test_branch_computes_the_dense_model(tmp_path):
    public = make_public(tmp_path)
    dense, _, _ = load_model(public)
    owner_rows = torch.randn(TINY.num_layers, TINY.d_model)
    for name, rows in (("zero-router", None), ("embedded-router", owner_rows)):
        anchor, cfg, meta = load_model(branch(public, tmp_path / name, rows))
        assert cfg.num_experts == 2 and cfg.top_k == 2
        with torch.no_grad():
            torch.testing.assert_close(anchor(_tokens()).logits, dense(_tokens()).logits, atol=1e-5, rtol=1e-5)
        assert meta["base_fingerprint"] == json.loads((public / "flexmoe.json").read_text())["fingerprint"]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_opt_out_equals_merge_without(tmp_path, top_k):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, ["code", "legal", "math"])
    full, _, meta = load_model(merge(public, pkgs, tmp_path / "all", top_k=top_k))
    tokens = _tokens(1)
    for j, dropped in enumerate(["code", "legal", "math"]):
        kept = [p for p in pkgs if p.name != f"pkg-{dropped}"]
        k = min(top_k, len(kept) + 1)
        without, _, _ = load_model(merge(public, kept, tmp_path / f"without-{dropped}-{top_k}", top_k=k))
        for name in (dropped, f"owner-{dropped}"):  # by domain and by owner
            mask = expert_mask(meta["experts"], [name])
            assert mask.tolist() == [s != j + 1 for s in range(4)]
            with torch.no_grad():
                got = full(tokens, mask).logits
                ref = without(tokens).logits
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
        # and opting out does change the output (the test would otherwise prove nothing)
        with torch.no_grad():
            assert (full(tokens).logits - got).abs().max() > 1e-4


def test_opt_out_unknown_name(tmp_path):
    public = make_public(tmp_path)
    _, _, meta = load_model(merge(public, make_packages(tmp_path, public, ["code"]), tmp_path / "m"))
    with pytest.raises(ValueError, match="unknown expert"):
        expert_mask(meta["experts"], ["legal"])
    with pytest.raises(ValueError, match="every expert"):
        expert_mask(meta["experts"], ["public", "code"])


def test_merged_slots_hold_public_and_packages(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, ["code", "math"])
    _, pub_sd, _ = load_model_dir(public)
    cfg, sd, meta = load_model_dir(merge(public, pkgs, tmp_path / "m"))
    assert cfg.num_experts == 3 and [e["domain"] for e in meta["experts"]] == ["public", "code", "math"]
    for i in range(cfg.num_layers):
        assert torch.equal(sd[f"layers.{i}.ffn.experts.gate_proj"][0], pub_sd[f"layers.{i}.ffn.gate_proj.weight"])
    for k, v in pub_sd.items():
        if ".ffn." not in k:
            assert torch.equal(sd[k], v), k


# --- refusals: one line naming the file, and nothing written -------------------------------------

def _refuse(tmp_path, capsys, public, pkgs, match):
    out = tmp_path / "refused"
    rc = cli_main(["merge", str(public), *map(str, pkgs), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    assert not out.exists()
    assert not list(tmp_path.glob(".refused.tmp-*"))
    return err


def test_refuses_other_base_model(tmp_path, capsys):
    public = make_public(tmp_path)
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = make_public(other_root, seed=5)
    pkg = make_packages(other_root, other, ["code"])[0]
    err = _refuse(tmp_path, capsys, public, [pkg], "fingerprint")
    assert str(pkg / "manifest.json") in err


def test_refuses_duplicate_domain(tmp_path, capsys):
    public = make_public(tmp_path)
    a = make_packages(tmp_path, public, ["code"])[0]
    b = shutil.copytree(a, tmp_path / "pkg-code-again")
    err = _refuse(tmp_path, capsys, public, [a, b], "already given")
    assert str(b) in err


def test_refuses_corrupted_file(tmp_path, capsys):
    public = make_public(tmp_path)
    pkg = make_packages(tmp_path, public, ["code"])[0]
    f = pkg / "expert.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    err = _refuse(tmp_path, capsys, public, [pkg], "sha256")
    assert str(f) in err


def test_refuses_shape_mismatch(tmp_path, capsys):
    public = make_public(tmp_path)
    other_root = tmp_path / "wide"
    other_root.mkdir()
    wide = make_public(other_root, TINY.replace(d_ff=64))
    pkg = make_packages(other_root, wide, ["code"])[0]
    # same base fingerprint is impossible with other shapes, so forge it to reach the shape check
    m = json.loads((pkg / "manifest.json").read_text())
    m["base_fingerprint"] = json.loads((public / "flexmoe.json").read_text())["fingerprint"]
    (pkg / "manifest.json").write_text(json.dumps(m))
    err = _refuse(tmp_path, capsys, public, [pkg], "shape")
    assert str(pkg / "expert.safetensors") in err


def test_refuses_missing_manifest_and_corrupt_public(tmp_path, capsys):
    public = make_public(tmp_path)
    pkg = make_packages(tmp_path, public, ["code"])[0]
    (pkg / "manifest.json").unlink()
    err = _refuse(tmp_path, capsys, public, [pkg], "missing")
    assert str(pkg / "manifest.json") in err
    pkg2 = make_packages(tmp_path / "x" if (tmp_path / "x").mkdir() is None else tmp_path, public, ["math"])[0]
    w = public / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01
    w.write_bytes(bytes(data))
    err = _refuse(tmp_path, capsys, public, [pkg2], "sha256")
    assert str(w) in err


def test_package_refuses_changed_shared_tensors(tmp_path):
    from flexmoe.io.model_dir import save_model_dir
    from flexmoe.flex.package import make_package

    public = make_public(tmp_path)
    anchor = branch(public, tmp_path / "a", None)
    cfg, sd, meta = load_model_dir(anchor)
    sd["layers.0.attn.q_proj.weight"] += 1e-3
    bad = save_model_dir(tmp_path / "bad", cfg, sd, meta)
    with pytest.raises(CheckpointError, match="fingerprint mismatch"):
        make_package(bad, tmp_path / "pkg", owner="o", domain="d")
    assert not (tmp_path / "pkg").exists()
