"""remove-expert: the release computes what the masked source computes and holds no slice of the expert."""

import json

import pytest
import torch
from safetensors import safe_open

from flexmoe.convert.hf_export import export_hf
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from flexmoe.flex.release import remove_expert
from helpers import NGRAM_BUCKETS, TINY, make_packages, make_public
from hfhelpers import refuse


@pytest.fixture()
def merged(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, ["code", "legal", "math"], ngram=True)
    return merge(public, pkgs, tmp_path / "merged", top_k=3, routing="topk")


@pytest.mark.parametrize("name,slot", [("legal", 2), ("owner-math", 3)])
def test_release_equals_masked_source(tmp_path, merged, name, slot):
    src, cfg, meta = load_model(merged)
    out = remove_expert(merged, tmp_path / "release", name)
    rel, rcfg, rmeta = load_model(out)
    assert (rcfg.num_experts, rcfg.top_k) == (3, 3)
    assert [e["slot"] for e in rmeta["experts"]] == [0, 1, 2]
    assert name not in {e["owner"] for e in rmeta["experts"]} | {e["domain"] for e in rmeta["experts"]}
    assert [(r["slot"], r["domain"]) for r in rmeta["removed"]] == [(slot, meta["experts"][slot]["domain"])]
    tokens = torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = src(tokens, expert_mask(meta["experts"], [name])).logits
        assert (src(tokens).logits - masked).abs().max() > 1e-4  # the expert mattered
        torch.testing.assert_close(rel(tokens).logits, masked, atol=1e-6, rtol=1e-6)
    # no tensor, and no expert slot, of the release equals the removed expert's slice
    _, sd, _ = load_model_dir(merged)
    gone = [v[slot] for k, v in sd.items() if ".ffn." in k and v.dim() >= 2]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        for k in f.keys():
            t = f.get_tensor(k)
            for part in ([t] + list(t) if t.dim() >= 2 else [t]):
                assert not any(g.shape == part.shape and torch.equal(g, part) for g in gone), k


def test_removing_twice_and_exporting(tmp_path, merged):
    once = remove_expert(merged, tmp_path / "r1", "code")
    twice = remove_expert(once, tmp_path / "r2", "math")
    cfg, sd, meta = load_model_dir(twice)
    assert cfg.num_experts == 2 and cfg.top_k == 2
    assert [e["domain"] for e in meta["experts"]] == ["public", "legal"]
    assert [r["domain"] for r in meta["removed"]] == ["code", "math"]
    assert sd["domain_centroids"].shape == (2, TINY.d_model)
    assert sd["domain_ngrams"].shape == (2, NGRAM_BUCKETS)  # document-routing profiles are sliced too
    _, before, _ = load_model_dir(merged)
    assert torch.equal(sd["domain_ngrams"], before["domain_ngrams"][[0, 2]])
    hf = export_hf(twice, tmp_path / "hf")
    assert json.loads((hf / "config.json").read_text())["num_experts"] == 2


def test_refuses_public_and_unknown_names(tmp_path, capsys, merged):
    err = refuse(capsys, ["remove-expert", str(merged), str(tmp_path / "out"), "--expert", "public"], tmp_path / "out")
    assert f"{merged / 'flexmoe.json'}: 'public' is slot 0" in err
    err = refuse(capsys, ["remove-expert", str(merged), str(tmp_path / "out"), "--expert", "poetry"], tmp_path / "out")
    assert f"{merged / 'flexmoe.json'}: no expert named 'poetry'" in err and "'legal'" in err and "'owner-code'" in err


def test_refuses_when_a_removed_slice_survives(tmp_path, capsys, merged):
    """An expert that is a byte copy of another cannot be proven gone."""
    cfg, sd, meta = load_model_dir(merged)
    sd["layers.1.ffn.experts.up_proj"][3] = sd["layers.1.ffn.experts.up_proj"][1]
    copied = save_model_dir(tmp_path / "copied", cfg, sd, meta)
    err = refuse(capsys, ["remove-expert", str(copied), str(tmp_path / "out"), "--expert", "math"], tmp_path / "out")
    assert f"{copied / 'model.safetensors'}: the removed expert's layers.1.ffn.experts.up_proj[3] is byte-identical to " \
           "layers.1.ffn.experts.up_proj[1]" in err
