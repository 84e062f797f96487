"""Attribution: per-token shares sum to 1 and are the router's own probabilities, recomputed here
from the router's inputs; masked experts get nothing; `flexmoe generate --attribution`."""

import json

import pytest
import torch
from helpers import TINY, make_packages, make_public

from flexmoe.train.load import load_model
from flexmoe.flex.attribution import attribution, token_weight_shares
from flexmoe.commands import COMMANDS
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask


@pytest.fixture(scope="module")
def merged3(tmp_path_factory):
    root = tmp_path_factory.mktemp("attr")
    public = make_public(root)
    pkgs = make_packages(root, public, ["code", "legal", "math"])
    return root, public, pkgs


def _tokens(seed=0, shape=(3, 24)):
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("top_k", [2, 4])
def test_shares_are_the_router_probabilities(merged3, top_k):
    root, public, pkgs = merged3
    model, cfg, meta = load_model(merge(public, pkgs, root / f"m{top_k}", top_k=top_k))
    tokens = _tokens()
    model.set_record_routing(True)
    with torch.no_grad():
        out = model(tokens, capture_hidden=True)
    model.set_record_routing(False)
    for layer, h, r in zip(model.moe_layers(), out.hidden_states, out.routing):
        shares = token_weight_shares(r, cfg.num_experts)
        torch.testing.assert_close(shares.sum(-1), torch.ones(shares.shape[0], dtype=torch.float64))
        # The router's probabilities, recomputed from its input, restricted to its top-k and renormalised.
        probs = torch.softmax(h.reshape(-1, cfg.d_model).float() @ layer.router.weight.float().T, -1).double()
        top = probs.topk(top_k, -1)
        want = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        want = want / want.sum(-1, keepdim=True)
        torch.testing.assert_close(shares, want, atol=1e-6, rtol=1e-6)
        assert float(shares.std(0).max()) > 0.01  # tokens really are routed differently
    rep = attribution(model, tokens, meta["experts"])
    assert rep["num_tokens"] == tokens.numel() and rep["num_layers"] == cfg.num_layers
    assert [e["domain"] for e in rep["experts"]] == ["public", "code", "legal", "math"]
    assert sum(e["weight"] for e in rep["experts"]) == pytest.approx(1.0)
    assert sum(e["tokens"] for e in rep["experts"]) == pytest.approx(1.0)
    for lay in rep["layers"]:
        assert sum(lay["weight"]) == pytest.approx(1.0)
    assert rep["owners"]["owner-code"]["weight"] == pytest.approx(rep["experts"][1]["weight"])
    if top_k == 4:  # every expert takes part: the shares are exactly the softmax, averaged over tokens
        assert rep["experts"][2]["tokens"] == pytest.approx(0.25)


def test_masked_expert_gets_nothing(merged3):
    root, public, pkgs = merged3
    model, _, meta = load_model(merge(public, pkgs, root / "mask"))
    mask = expert_mask(meta["experts"], ["legal"])
    rep = attribution(model, _tokens(1), meta["experts"], expert_mask=mask)
    legal = rep["experts"][2]
    assert legal["weight"] == 0 and legal["tokens"] == 0
    assert sum(e["weight"] for e in rep["experts"]) == pytest.approx(1.0)
    unmasked = attribution(model, _tokens(1), meta["experts"])
    assert unmasked["experts"][2]["weight"] > 0.05


def test_positions_restrict_to_generated_tokens(merged3):
    root, public, pkgs = merged3
    model, _, meta = load_model(merge(public, pkgs, root / "pos"))
    tokens = _tokens(2)
    part = attribution(model, tokens[:, :20], meta["experts"], positions=slice(10, None))
    assert part["num_tokens"] == 3 * 10
    # Causal: positions 10..19 route the same whether or not positions 20.. follow.
    same = attribution(model, tokens, meta["experts"], positions=slice(10, 20))
    for a, b in zip(part["experts"], same["experts"]):
        assert a["weight"] == pytest.approx(b["weight"], abs=1e-6) and a["tokens"] == pytest.approx(b["tokens"])
    whole = attribution(model, tokens, meta["experts"])
    assert max(abs(a["weight"] - b["weight"]) for a, b in zip(part["experts"], whole["experts"])) > 1e-4

def test_generate_cli_prints_attribution(tmp_path, capsys):
    from helpers import make_trained_anchor

    from flexmoe.config import ModelConfig
    from flexmoe.flex.package import make_package

    cfg = ModelConfig(vocab_size=258, d_model=32, num_layers=2, num_heads=4, d_ff=48)
    public = make_public(tmp_path, cfg)
    trained = make_trained_anchor(tmp_path, public, "code", seed=3)
    pkg = make_package(trained, tmp_path / "pkg", owner="acme", domain="code")
    merged = merge(public, [pkg], tmp_path / "merged")
    rc = COMMANDS["generate"]([str(merged), "--prompt", "def main():", "--max-new-tokens", "8", "--num-samples", "2",
                               "--temperature", "0.8", "--attribution", "--json", "--tokenizer", "bytes"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["continuations"]) == 2
    rep = out["attribution"]
    assert rep["num_tokens"] == 2 * 8  # the positions that produced the 8 new tokens of each sample
    assert sum(e["weight"] for e in rep["experts"]) == pytest.approx(1.0)
    assert {e["owner"] for e in rep["experts"]} == {"public", "acme"}
    assert COMMANDS["generate"]([str(merged), "--prompt", "x", "--max-new-tokens", "3", "--greedy",
                                 "--attribution", "--opt-out", "code", "--tokenizer", "bytes"]) == 0
    text = capsys.readouterr().out
    assert "acme" in text and "0.0%" in text  # opted out: attributed nothing
