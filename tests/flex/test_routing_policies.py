"""Routing policies of merged models: opt-out stays exact, document routing is causal and
reproduces an owner's own model when it picks that owner."""

import pytest
import torch

from flexmoe.train.load import load_model
from flexmoe.flex.merge import merge
from flexmoe.flex.optout import expert_mask
from helpers import NGRAM_BUCKETS, TINY, make_packages, make_public, make_trained_anchor

DOMAINS = ["code", "legal", "math"]


def _tokens(seed=0, shape=(3, 24)):
    return torch.randint(0, TINY.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("routing", ["anchor_top1", "anchor_doc", "anchor_ngram"])
def test_opt_out_exact_under_policy(tmp_path, routing):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS, ngram=routing == "anchor_ngram")
    full, _, meta = load_model(merge(public, pkgs, tmp_path / "all", routing=routing))
    tokens = _tokens()
    for dropped in DOMAINS:
        kept = [p for p in pkgs if p.name != f"pkg-{dropped}"]
        without, _, _ = load_model(merge(public, kept, tmp_path / f"w-{dropped}", routing=routing))
        with torch.no_grad():
            got = full(tokens, expert_mask(meta["experts"], [dropped])).logits
            torch.testing.assert_close(got, without(tokens).logits, atol=1e-6, rtol=1e-6)


def test_document_routing_reproduces_the_owners_model(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS)
    merged, cfg, _ = load_model(merge(public, pkgs, tmp_path / "m", routing="anchor_doc"))
    tokens = _tokens(1)
    for j, d in enumerate(DOMAINS, start=1):
        # put owner d's centroid at the origin and the others far away: every token picks d
        with torch.no_grad():
            merged.domain_centroids.fill_(1e3)
            merged.domain_centroids[j] = 0.0
        owner, _, _ = load_model(tmp_path / f"trained-{d}")
        with torch.no_grad():
            torch.testing.assert_close(merged(tokens).logits, owner(tokens).logits, atol=1e-5, rtol=1e-5)
    # public centroid nearest: anchor only, i.e. the public model
    dense, _, _ = load_model(public)
    with torch.no_grad():
        merged.domain_centroids.fill_(1e3)
        merged.domain_centroids[0] = 0.0
        torch.testing.assert_close(merged(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)


def test_ngram_routing_reproduces_the_owners_model(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS, ngram=True)
    merged, cfg, _ = load_model(merge(public, pkgs, tmp_path / "m", routing="anchor_ngram"))
    assert cfg.doc_ngram_buckets == NGRAM_BUCKETS
    tokens = _tokens(1)
    for j, d in enumerate(DOMAINS, start=1):
        with torch.no_grad():  # owner d's profile gives every n-gram the highest probability: d wins everywhere
            merged.domain_ngrams.fill_(-50.0)
            merged.domain_ngrams[j] = -1.0
        owner, _, _ = load_model(tmp_path / f"trained-{d}")
        with torch.no_grad():
            torch.testing.assert_close(merged(tokens).logits, owner(tokens).logits, atol=1e-5, rtol=1e-5)
    dense, _, _ = load_model(public)
    with torch.no_grad():
        merged.domain_ngrams.fill_(-50.0)
        merged.domain_ngrams[0] = -1.0
        torch.testing.assert_close(merged(tokens).logits, dense(tokens).logits, atol=1e-5, rtol=1e-5)


def test_ngram_routing_refused_without_profiles(tmp_path):
    from flexmoe.io.model_dir import CheckpointError

    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, ["code"], ngram=True) + make_packages(tmp_path, public, ["legal"])
    with pytest.raises(CheckpointError, match=r"pkg-legal/expert.safetensors: has no n-gram profile"):
        merge(public, pkgs, tmp_path / "m", routing="anchor_ngram")
    assert not (tmp_path / "m").exists()
    _, cfg, _ = load_model(merge(public, pkgs, tmp_path / "m-topk"))  # top-k needs none: merged without them
    assert cfg.doc_ngram_buckets == 0


@pytest.mark.parametrize("routing", ["anchor_doc", "anchor_ngram"])
def test_document_routing_is_causal(tmp_path, routing):
    public = make_public(tmp_path)
    merged, _, _ = load_model(merge(public, make_packages(tmp_path, public, DOMAINS, ngram=True), tmp_path / "m",
                                    routing=routing))
    a = _tokens(2, (2, 30))
    b = a.clone()
    b[:, 20:] = _tokens(3, (2, 10))
    with torch.no_grad():
        la, lb = merged(a).logits, merged(b).logits
    assert torch.equal(la[:, :20], lb[:, :20])
    assert not torch.equal(la[:, 20:], lb[:, 20:])


def test_anchor_top1_equals_topk_on_two_experts(tmp_path):
    public = make_public(tmp_path)
    trained = make_trained_anchor(tmp_path, public, "code", seed=7)
    a, cfg, _ = load_model(trained)
    b, _, _ = load_model(trained, routing="anchor_top1")
    with torch.no_grad():
        torch.testing.assert_close(a(_tokens()).logits, b(_tokens()).logits, atol=1e-6, rtol=1e-6)


def test_router_row_transforms(tmp_path):
    from flexmoe.io.model_dir import load_model_dir

    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS)
    _, raw, _ = load_model_dir(merge(public, pkgs, tmp_path / "raw"))
    _, cn, _ = load_model_dir(merge(public, pkgs, tmp_path / "cn", router_rows="common_norm"))
    _, cc, _ = load_model_dir(merge(public, pkgs, tmp_path / "cc", router_rows="centred_norm"))
    r, a, c = (x["layers.1.ffn.router.weight"] for x in (raw, cn, cc))
    assert not torch.allclose(r.norm(dim=-1), r.norm(dim=-1).mean().expand(4))
    torch.testing.assert_close(a.norm(dim=-1), r.norm(dim=-1).mean().expand(4))
    torch.testing.assert_close(a / a.norm(dim=-1, keepdim=True), r / r.norm(dim=-1, keepdim=True))
    off = (c[1:] - c[:1]).norm(dim=-1)
    torch.testing.assert_close(off, off.mean().expand(3))
    assert torch.equal(c[0], r[0])
    # why centring alone is not offered: a shared shift of every row leaves the softmax unchanged
    h = torch.randn(5, r.shape[1])
    torch.testing.assert_close((h @ r.T).softmax(-1), (h @ (r - r[:1]).T).softmax(-1), atol=1e-6, rtol=1e-5)


def test_cosine_routing_ignores_row_norms_and_keeps_opt_out_exact(tmp_path):
    public = make_public(tmp_path)
    pkgs = make_packages(tmp_path, public, DOMAINS)
    merged, cfg, meta = load_model(merge(public, pkgs, tmp_path / "cos", routing="topk", router_cosine_temp=0.1))
    assert cfg.router_cosine_temp == 0.1
    tokens = _tokens(4)
    with torch.no_grad():
        before = merged(tokens).logits
        for m in merged.moe_layers():
            m.router.weight[2] *= 7.0  # a larger row wins no tokens under cosine routing
        torch.testing.assert_close(merged(tokens).logits, before, atol=1e-6, rtol=1e-6)
    without, _, _ = load_model(merge(public, [p for p in pkgs if p.name != "pkg-legal"], tmp_path / "cos-w",
                                     routing="topk", router_cosine_temp=0.1))
    merged, _, _ = load_model(tmp_path / "cos")
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens, expert_mask(meta["experts"], ["legal"])).logits,
                                   without(tokens).logits, atol=1e-6, rtol=1e-6)
    dot, _, _ = load_model(merge(public, pkgs, tmp_path / "dot", routing="topk"))
    with torch.no_grad():
        assert (dot(tokens).logits - before).abs().max() > 1e-4  # it is a different policy
