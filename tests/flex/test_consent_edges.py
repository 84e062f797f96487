"""Consent and opt-out at the edges (issue 18, point 5): `eval --use`, a soup baseline that honours
the mask, `export-hf --use` dropping experts not allowed, refusal of unrecorded consent, and the
model card every export writes."""

import json
import math

import pytest
import torch

from flexmoe.cli import main as cli
from flexmoe.data import ByteTokenizer, prepare_data
from flexmoe.eval.baselines import soup_model
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package
from flexmoe.io.keys import dense_ffn_key, experts_key
from flexmoe.io.model_dir import load_model_dir
from flexmoe.train.load import load_model

from helpers import TINY, make_public, make_trained_anchor

CONSENT = {"math": ["research"], "code": ["research", "commercial"], "law": None}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    public = make_public(root, TINY.replace(vocab_size=258))  # the byte tokenizer's ids
    pkgs = []
    for i, (d, uses) in enumerate(CONSENT.items()):
        trained = make_trained_anchor(root, public, d, seed=300 + i)
        pkgs.append(make_package(trained, root / f"pkg-{d}", owner=f"owner-{d}", domain=d, licence="apache-2.0",
                                 allowed_uses=uses))
    merged = merge(public, pkgs, root / "merged", top_k=2, routing="topk")
    text = root / "t.txt"
    text.write_text("0123456789 abc " * 400)
    prepare_data([text], root / "data", ByteTokenizer(), progress=False)
    return {"root": root, "public": public, "merged": merged, "data": root / "data"}


def _eval(capsys, *args) -> dict:
    assert cli(["eval", *map(str, args), "--seq-len", "16", "--num-windows", "4"]) == 0
    return json.loads(capsys.readouterr().out)["perplexity"]


def test_soup_averages_only_the_experts_left_on(world):
    model, cfg, _ = load_model(world["merged"])
    mask = torch.tensor([True, False, True, True])  # math (slot 1) opted out
    soup = soup_model(model, mask).state_dict()
    full = soup_model(model).state_dict()
    key = experts_key(0, "gate_proj")
    stacked = model.state_dict()[key]
    want = stacked[[0, 2, 3]].float().mean(0)
    assert torch.equal(soup[dense_ffn_key(0, "gate_proj")], want)
    assert not torch.allclose(full[dense_ffn_key(0, "gate_proj")], want)


def test_eval_soup_with_opt_out_differs_and_use_masks_like_opt_out(world, capsys):
    plain = _eval(capsys, world["merged"], "--data", f"x={world['data']}", "--soup")
    out = _eval(capsys, world["merged"], "--data", f"x={world['data']}", "--soup", "--opt-out", "math")
    assert plain["soup"]["x"] != out["soup"]["x"]  # the soup lost the math expert
    # --use commercial: math (research only) and law (no record) are off = opt-out of both
    use = _eval(capsys, world["merged"], "--data", f"x={world['data']}", "--soup", "--use", "commercial")
    both = _eval(capsys, world["merged"], "--data", f"x={world['data']}", "--soup", "--opt-out", "math,law")
    assert use == both
    assert math.isfinite(use["model"]["x"])


def test_export_hf_refuses_unrecorded_consent(world, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert cli(["export-hf", str(world["merged"]), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "owner-law/law" in err and "--allow-unrecorded-consent" in err
    assert not dst.exists() and not list(tmp_path.glob(".hf.*"))


def test_export_hf_use_drops_experts_not_allowed(world, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert cli(["export-hf", str(world["merged"]), str(dst), "--use", "commercial"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["num_experts"] == 2  # public + code
    meta = json.loads((dst / "flexmoe.json").read_text())
    assert [e["domain"] for e in meta["experts"]] == ["public", "code"]
    assert {r["domain"] for r in meta["removed"]} == {"math", "law"}
    # the kept expert's weights are the code expert's, bit for bit
    _, sd, _ = load_model_dir(world["merged"])
    from safetensors.torch import load_file

    hf = {}
    for f in dst.glob("*.safetensors"):
        hf.update(load_file(str(f)))
    name = next(k for k in hf if k.endswith("layers.0.mlp.experts.1.gate_proj.weight"))
    code = sd[experts_key(0, "gate_proj")][2]
    assert torch.equal(hf[name], code.reshape(hf[name].shape))
    card = (dst / "README.md").read_text()
    assert card.startswith("---\n") and "license: \"apache-2.0\"" in card
    assert "**commercial**" in card and "owner-code" in card and "commercial, research" in card
    assert "owner-math/math, removed" in card and "owner-law/law, removed" in card
    assert not list(tmp_path.glob(".hf.*"))  # the intermediate release is gone


def test_export_hf_use_nobody_allows_is_refused(world, tmp_path, capsys):
    dst = tmp_path / "hf"
    assert cli(["export-hf", str(world["merged"]), str(dst), "--use", "education"]) == 2
    assert "no owner's expert consents to use=education" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.glob(".hf.*"))


def test_eval_use_on_a_dense_model_is_refused(world, capsys):
    with pytest.raises(SystemExit) as e:
        cli(["eval", str(world["public"]), "--data", f"x={world['data']}", "--use", "research"])
    assert e.value.code == 2
