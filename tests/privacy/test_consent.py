"""Consent registry: a use= request activates only consenting experts, exactly as an opt-out;
expiry dates count; the registry is bound to the tensors, so a swapped expert is caught."""

import json

import pytest
import torch
from helpers import TINY, make_public, make_trained_anchor
from safetensors.torch import load_file, save_file

from flexmoe.io.model_dir import META, WEIGHTS, CheckpointError, read_json, write_json
from flexmoe.train.load import load_model
from flexmoe.io.files import sha256_file
from flexmoe.commands import COMMANDS
from flexmoe.flex.consent import active_mask, consent_mask, load_for_use
from flexmoe.flex.merge import merge
from flexmoe.flex.package import make_package

TERMS = {  # domain: (allowed uses, expiry)
    "code": (["research"], None),
    "legal": (["commercial", "research"], "2030-06-30"),
    "math": (None, None),  # no consent recorded
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("consent")
    public = make_public(root)
    pkgs = {}
    for i, (d, (uses, expires)) in enumerate(TERMS.items()):
        trained = make_trained_anchor(root, public, d, seed=200 + i)
        pkgs[d] = make_package(trained, root / f"pkg-{d}", owner=f"owner-{d}", domain=d, licence="CC-BY-4.0",
                               allowed_uses=uses, expires=expires)
    merged = merge(public, list(pkgs.values()), root / "merged")
    return root, public, pkgs, merged


def _tokens(seed=0):
    return torch.randint(0, TINY.vocab_size, (3, 20), generator=torch.Generator().manual_seed(seed))


def test_merged_manifest_carries_consent_and_hashes(world):
    _, _, _, merged = world
    experts = read_json(merged / META)["experts"]
    assert [e["consent"] for e in experts] == [
        {"allowed_uses": ["any"], "expires": None},
        {"allowed_uses": ["research"], "expires": None},
        {"allowed_uses": ["commercial", "research"], "expires": "2030-06-30"},
        None,
    ]
    hashes = [e["tensor_sha256"] for e in experts]
    assert len(set(hashes)) == 4 and all(len(h) == 64 for h in hashes)


def test_commercial_use_equals_merge_without_research_only_expert(world):
    root, public, pkgs, merged = world
    model, _, meta, mask = load_for_use(merged, use="commercial", today="2025-01-01")
    assert mask.tolist() == [True, False, True, False]  # code is research-only, math recorded nothing
    without, _, _ = load_model(merge(public, [pkgs["legal"]], root / "legal-only"))
    with torch.no_grad():
        got, ref, full = model(_tokens(), mask).logits, without(_tokens()).logits, model(_tokens()).logits
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    assert (full - got).abs().max() > 1e-4  # the research-only expert did contribute without use=

    _, _, _, research = load_for_use(merged, use="research", today="2025-01-01")
    assert research.tolist() == [True, True, True, False]
    assert load_for_use(merged)[3] is None  # no use= asked: every expert on, as before


def test_expiry_and_opt_out_combine(world):
    _, _, _, merged = world
    experts = read_json(merged / META)["experts"]
    assert consent_mask(experts, "commercial", "2030-06-30").tolist() == [True, False, True, False]  # last day
    assert consent_mask(experts, "commercial", "2030-07-01").tolist() == [True, False, False, False]
    assert active_mask(experts, use="research", opt_out=["code"], today="2025-01-01").tolist() == [
        True, False, True, False]
    with pytest.raises(ValueError, match="use='personal'"):
        consent_mask(experts, "personal")
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        consent_mask(experts, "research", "30/06/2030")


def test_package_refuses_unknown_use(world):
    root, public, _, _ = world
    trained = root / "trained-code"
    with pytest.raises(ValueError, match="unknown use"):
        make_package(trained, root / "bad-use", owner="o", domain="code", allowed_uses=["comercial"])
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        make_package(trained, root / "bad-date", owner="o", domain="code", allowed_uses=["research"], expires="soon")
    assert not (root / "bad-use").exists() and not (root / "bad-date").exists()


def _tamper(src, dst, edit_tensors=None, edit_experts=None):
    """Copy a merged model, change it, and rewrite the file sha256s as a forger would."""
    import shutil

    shutil.copytree(src, dst)
    if edit_tensors:
        sd = load_file(str(dst / WEIGHTS))
        edit_tensors(sd)
        save_file(sd, str(dst / WEIGHTS))
    meta = read_json(dst / META)
    if edit_experts:
        edit_experts(meta["experts"])
    meta["files"][WEIGHTS] = sha256_file(dst / WEIGHTS)
    write_json(dst / META, meta)
    return dst


def test_swapped_expert_is_detected(world):
    root, _, _, merged = world

    def swap_slots(sd):  # the research-only expert moved into the commercial expert's slot
        for k, v in sd.items():
            if ".ffn.experts." in k or k.endswith("router.weight"):
                v[[1, 2]] = v[[2, 1]].clone()

    forged = _tamper(merged, root / "forged-tensors", edit_tensors=swap_slots)
    with pytest.raises(CheckpointError, match="slot 1 .*tensor_sha256"):
        load_for_use(forged, use="commercial")

    def swap_records(experts):  # the consent records swapped instead, tensors untouched
        for key in ("consent", "tensor_sha256"):
            experts[1][key], experts[2][key] = experts[2][key], experts[1][key]

    forged = _tamper(merged, root / "forged-records", edit_experts=swap_records)
    with pytest.raises(CheckpointError, match="slot 1"):
        load_for_use(forged, use="commercial")

    def nudge(sd):  # one value of one expert changed
        sd["layers.1.ffn.experts.down_proj"][3, 0, 0] += 1e-3

    with pytest.raises(CheckpointError, match="slot 3"):
        load_for_use(_tamper(merged, root / "forged-nudge", edit_tensors=nudge))


def test_consent_cli(world, capsys):
    _, _, pkgs, merged = world
    assert COMMANDS["consent"]([str(merged), "--use", "commercial", "--date", "2025-01-01", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["active"] for r in rows["experts"]] == [True, False, True, False]
    assert rows["tensor_hashes_checked"] == 4
    assert COMMANDS["consent"]([str(pkgs["legal"])]) == 0
    out = capsys.readouterr().out
    assert "commercial,research" in out and "2030-06-30" in out
