"""Top-k calibration (recipes/calibrate.py, `merge --routing topk --calibrate`): the refitted router
rows make per-token top-k pick the document router's experts on more tokens than the stacked rows,
only router tensors change, and the rows-only release exports to Hugging Face and loads there."""

import json

import pytest
import torch

from flexmoe.recipes.calibrate import CalibrationConfig, calibrated_merge, agreement, document_targets, router_inputs, with_routing
from flexmoe.flex.merge import merge
from flexmoe.io.keys import router_weight_key
from flexmoe.train.load import load_model
from tests.helpers import make_packages, make_public

DOMAINS = ["code", "legal"]


def _agreement(model_doc, model_topk, tokens):
    targets = document_targets(model_doc, tokens)
    got = [agreement(model_topk.layers[i].ffn.router.logits(router_inputs(model_topk, tokens, i)), t).float().mean()
           for i, t in enumerate(targets)]
    return float(torch.stack(got).mean())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def merges(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("cal")
    public = make_public(root)
    pkgs = make_packages(root, public, DOMAINS, ngram=True)
    doc = merge(public, pkgs, root / "doc", routing="anchor_ngram")
    plain = merge(public, pkgs, root / "topk", routing="topk")
    cal = calibrated_merge(public, pkgs, root / "cal", CalibrationConfig(generated_per_owner=12, seq_len=48, steps=200))
    return root, doc, plain, cal


def test_calibrated_topk_imitates_document_routing(merges):
    root, doc, plain, cal = merges
    model_doc, _, _ = load_model(doc)
    plain_m, pcfg, _ = load_model(plain)
    cal_m, ccfg, meta = load_model(cal)
    assert ccfg.routing == "topk" and not ccfg.router_bias and pcfg == ccfg
    rec = meta["calibration"]
    assert rec["mode"] == "rows" and rec["tokens"] == 2 * 12 * 48 and len(rec["layers"]) == ccfg.num_layers
    # only the router rows differ from the plain top-k merge; the anchor's and everything else as merged
    sd_p, sd_c = plain_m.state_dict(), cal_m.state_dict()
    routers = {router_weight_key(i) for i in range(ccfg.num_layers)}
    for k in sd_p:
        if k in routers:
            assert not torch.equal(sd_p[k], sd_c[k]), k
        else:
            assert torch.equal(sd_p[k], sd_c[k]), k
    # held-out text (not the calibration text): sampled anew from the owners' models
    from flexmoe.recipes.calibrate import owner_text

    tokens = torch.cat([owner_text(with_routing(model_doc, "topk"), s, 8, 48, seed=5) for s in (1, 2)]
                       + [torch.randint(0, ccfg.vocab_size, (8, 48), generator=torch.Generator().manual_seed(3))])
    before, after = _agreement(model_doc, plain_m.eval(), tokens), _agreement(model_doc, cal_m.eval(), tokens)
    # measured: 0.265 -> 0.729 (tiny random model, random profiles, a third of the held-out text random tokens)
    assert after >= before + 0.2, (before, after)


def test_calibrated_release_exports_and_loads(merges, tmp_path):
    transformers = pytest.importorskip("transformers")
    from flexmoe.convert.hf_export import export_hf

    _, _, _, cal = merges
    out = export_hf(cal, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    native, cfg, _ = load_model(cal)
    tokens = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits.float(), native.eval()(tokens).logits.float(), atol=1e-4, rtol=1e-4)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["FlexOlmoForCausalLM"]


def test_calibrate_refusals(merges, tmp_path, capsys):
    from flexmoe.cli import main

    root, *_ = merges
    public, pkgs = root / "public", [str(root / f"pkg-{d}") for d in DOMAINS]
    for extra, said in ((["--routing", "anchor_ngram", "--calibrate", "rows"], "needs --routing topk"),
                        (["--calibrate", "rows", "--calibrate-data", str(tmp_path / "nothing")],
                         "not a prepared token directory"),
                        (["--calibrate-data", str(tmp_path)], "needs --calibrate")):
        with pytest.raises(SystemExit) as e:
            main(["merge", str(public), *pkgs, "--out", str(tmp_path / "x"), *extra])
        assert e.value.code == 2 and said in capsys.readouterr().err
    # packages without n-gram profiles: one line, exit 2, no output and no scratch left behind
    bare = make_packages(tmp_path, root / "public", ["math"])
    assert main(["merge", str(public), str(bare[0]), "--out", str(tmp_path / "x"), "--calibrate", "rows"]) == 2
    assert "has no n-gram profile" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if "calibrate" in p.name]
