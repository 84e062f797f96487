"""merge takes Hugging Face 2-expert FlexOlmo checkpoints next to packages, and only from the same public model."""

import json

import pytest
import torch
from safetensors import safe_open

from flexmoe.convert.hf_export import export_hf
from flexmoe.train.load import load_model
from flexmoe.io.model_dir import load_model_dir, save_model_dir
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from flexmoe.flex.package import make_package
from helpers import TINY, make_public, make_trained_anchor
from hfhelpers import refuse


@pytest.fixture()
def world(tmp_path):
    """A public model, two owners' trained anchors, each as an HF export and as a package."""
    public = make_public(tmp_path)
    out = {"public": public}
    for i, domain in enumerate(["code", "math"]):
        trained = make_trained_anchor(tmp_path, public, domain, seed=100 + i)
        out[f"hf-{domain}"] = export_hf(trained, tmp_path / f"hf-{domain}", max_shard_size="20KB")
        out[f"pkg-{domain}"] = make_package(trained, tmp_path / f"pkg-{domain}", owner=domain, domain=domain)
    return out


def _tokens():
    return torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))


def test_merge_of_hf_anchors_equals_merge_of_packages(tmp_path, world):
    hf = merge(world["public"], [world["hf-code"], world["hf-math"]], tmp_path / "m-hf")
    pk = merge(world["public"], [world["pkg-code"], world["pkg-math"]], tmp_path / "m-pkg")
    cfg, sd_hf, meta = load_model_dir(hf)
    _, sd_pk, _ = load_model_dir(pk)
    assert cfg.num_experts == 3
    assert [e["domain"] for e in meta["experts"]] == ["public", "hf-code", "hf-math"]  # unnamed: directory names
    assert sorted(sd_hf) == sorted(sd_pk)
    assert [k for k in sd_hf if not torch.equal(sd_hf[k], sd_pk[k])] == []
    # router row 0 is the public model's shipped row, not the HF checkpoint's row 0
    _, pub_sd, pub_meta = load_model_dir(world["public"])
    with safe_open(str(world["public"] / pub_meta["router_embedding"]["router_public"]), "pt") as f:
        public_rows = f.get_tensor("router_embedding")
    assert torch.equal(sd_hf["layers.1.ffn.router.weight"][0], public_rows[1])


def test_masking_an_hf_expert_equals_merging_without_it(tmp_path, world):
    full, _, meta = load_model(merge(world["public"], [world["hf-code"], world["hf-math"]], tmp_path / "all"))
    without, _, _ = load_model(merge(world["public"], [world["hf-code"]], tmp_path / "without"))
    tokens = _tokens()
    with torch.no_grad():
        got = full(tokens, expert_mask(meta["experts"], ["hf-math"])).logits
        ref = without(tokens).logits
        assert (full(tokens).logits - got).abs().max() > 1e-4  # the expert mattered
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_mixing_hf_and_package_inputs(tmp_path, world):
    mixed = merge(world["public"], [world["hf-code"], world["pkg-math"]], tmp_path / "mixed")
    pk = merge(world["public"], [world["pkg-code"], world["pkg-math"]], tmp_path / "pk")
    _, a, meta = load_model_dir(mixed)
    _, b, _ = load_model_dir(pk)
    assert [e["domain"] for e in meta["experts"]] == ["public", "hf-code", "math"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_hf_public_model_input(tmp_path, world):
    """A dense HF export of the public model works as merge's public input, shipped router row included."""
    hf_public = export_hf(world["public"], tmp_path / "hf-public")
    assert (hf_public / "flexmoe" / "router_public.safetensors").is_file()
    cfg, sd, meta = load_model_dir(merge(hf_public, [world["pkg-code"]], tmp_path / "m"))
    _, ref, _ = load_model_dir(merge(world["public"], [world["pkg-code"]], tmp_path / "ref"))
    assert meta["base_fingerprint"] == json.loads((world["public"] / "flexmoe.json").read_text())["fingerprint"]
    assert sorted(sd) == sorted(ref)
    assert [k for k in sd if not torch.equal(sd[k], ref[k])] == []
    assert sd["layers.0.ffn.router.weight"][0].abs().sum() > 0  # the public row, not zeros


def test_refuses_hf_anchor_of_another_public_model(tmp_path, capsys, world):
    cfg, sd, meta = load_model_dir(tmp_path / "trained-code")
    sd["layers.1.attn.v_proj.weight"][0, 0] += 1e-3  # one shared weight moved during "training"
    bad = export_hf(save_model_dir(tmp_path / "bad", cfg, sd, meta), tmp_path / "hf-bad", max_shard_size="20KB")
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    shard = bad / index["model.layers.1.self_attn.v_proj.weight"]
    err = refuse(capsys, ["merge", str(world["public"]), str(world["hf-math"]), str(bad), "--out", str(tmp_path / "refused")],
                 tmp_path / "refused")
    assert f"{shard}: shared tensors or expert 0 differ from the public model" in err


def test_refuses_hf_checkpoint_with_more_experts(tmp_path, capsys, world):
    three = merge(world["public"], [world["pkg-code"], world["pkg-math"]], tmp_path / "three")
    hf3 = export_hf(three, tmp_path / "hf3")
    err = refuse(capsys, ["merge", str(world["public"]), str(hf3), "--out", str(tmp_path / "refused")], tmp_path / "refused")
    assert f"{hf3 / 'config.json'}:" in err and "num_experts=3" in err
