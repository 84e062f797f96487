"""Book-keeping clipping (train/ghost.py) against the one-backward-per-window reference: per-unit
norms and the clipped, noised update equal to 1e-5 (fp32, same noise seed), for window and
document units, for top-k and every anchor_* routing policy, with trainable router biases."""

import numpy as np
import pytest
import torch

from flexmoe.config import ModelConfig
from flexmoe.model import Transformer
from flexmoe.train import ghost
from flexmoe.train.freeze import PLANS, apply_freeze_plan
from flexmoe.train.privacy import clipped_sample_grads, private_gradient, trainable_masks

CFG = ModelConfig(vocab_size=97, d_model=32, num_layers=3, num_heads=4, d_ff=64, num_experts=3, top_k=2,
                  max_seq_len=64, router_bias=True)
UNITS = {"window": None, "document": torch.tensor([0, 0, 1, 2, 2, 2, 3])}


def _model(routing: str, plan: str = "expert_anchor") -> Transformer:
    cfg = CFG.replace(routing=routing, doc_ngram_buckets=64 if routing == "anchor_ngram" else 0)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.weight.normal_(0, 0.5)  # owners' rows far enough apart that routing varies by token
            m.router.bias.uniform_(-0.5, 0.0)
        model.domain_centroids.normal_(0, 1.0)
        model.domain_centroids[0] += 10.0  # the public centroid far off: anchor_doc picks owners' experts
        if routing == "anchor_ngram":
            model.domain_ngrams.uniform_(-5, 0)
    apply_freeze_plan(model, PLANS[plan])
    return model


def _batch(B: int = 7, S: int = 24) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("unit", sorted(UNITS))
@pytest.mark.parametrize("routing", ["topk", "anchor_top1", "anchor_doc", "anchor_ngram"])
def test_book_keeping_equals_the_reference(routing, unit):
    model = _model(routing)
    params = [p for p in model.parameters() if p.requires_grad]
    assert ghost.supported(model, params) is None
    masks, batch, units = trainable_masks(params), _batch(), UNITS[unit]
    U = 7 if units is None else int(units.max()) + 1

    raw = list(clipped_sample_grads(model, batch, params, float("inf"), masks, unit_of_window=units))
    ref_norms = np.array([n for _, n, _ in raw])
    s = np.sort(ref_norms)
    clip = float(s[len(s) // 2 - 1] + s[len(s) // 2]) / 2  # about half the units clipped, none on the edge
    assert (ref_norms > clip * 1.001).sum() >= 1 and (ref_norms < clip * 0.999).sum() >= 1
    got, norms, _ = ghost.book_keeping_grads(model, batch, torch.arange(7) if units is None else units, U, params,
                                             clip, masks)
    np.testing.assert_allclose(norms.numpy(), ref_norms, rtol=1e-5)

    kw = dict(max_grad_norm=clip, noise_multiplier=0.7, expected_batch_size=5.0, masks=masks, unit_of_window=units)
    ref, ref_stats = private_gradient(model, batch, params, generator=torch.Generator().manual_seed(11),
                                      clipping="per_unit_backward", **kw)
    bk, bk_stats = private_gradient(model, batch, params, generator=torch.Generator().manual_seed(11),
                                    clipping="book_keeping", **kw)
    assert bk_stats["clipping"] == "book_keeping" and ref_stats["clipping"] == "per_unit_backward"
    assert bk_stats["batch_size"] == ref_stats["batch_size"] == U
    assert bk_stats["clipped_fraction"] == ref_stats["clipped_fraction"] > 0
    assert bk_stats["loss"] == pytest.approx(ref_stats["loss"], rel=1e-5)
    for p, r, b in zip(params, ref, bk):
        torch.testing.assert_close(b, r, atol=1e-5, rtol=1e-5)
    # the clipped sum itself (no noise) is not all noise: compare it too, against its own scale
    clean = [g for g in got]
    ref_clean = [sum(gs[j] for gs, _, _ in clipped_sample_grads(model, batch, params, clip, masks,
                                                                unit_of_window=units)) for j in range(len(params))]
    for c, r in zip(clean, ref_clean):
        torch.testing.assert_close(c, r, atol=1e-6, rtol=1e-5)
    assert max(float(r.abs().max()) for r in ref_clean) > 1e-3


def test_frozen_rows_take_no_gradient_and_no_noise():
    model = _model("topk")
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads, _ = private_gradient(model, _batch(), params, max_grad_norm=0.1, noise_multiplier=1.0,
                                expected_batch_size=5.0, generator=torch.Generator().manual_seed(0),
                                masks=trainable_masks(params), clipping="book_keeping")
    for n, g in zip(names, grads):
        if "router" in n:
            assert float(g[0].abs().max()) == 0 and float(g[1:].abs().max()) > 0, n


def test_unsupported_models_fall_back_or_refuse():
    model = _model("topk", plan="sft")  # attention trains too: not covered by book-keeping
    params = [p for p in model.parameters() if p.requires_grad]
    assert "outside the experts" in ghost.supported(model, params)
    kw = dict(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4.0, masks=trainable_masks(params))
    with pytest.raises(ValueError, match="privacy.clipping=book_keeping"):
        private_gradient(model, _batch(3), params, generator=torch.Generator(), clipping="book_keeping", **kw)
    _, stats = private_gradient(model, _batch(3), params, generator=torch.Generator(), **kw)
    assert stats["clipping"] == "per_unit_backward"
    lb = Transformer(CFG.replace(lb_loss_weight=0.01))
    apply_freeze_plan(lb, PLANS["expert_anchor"])
    assert "auxiliary" in ghost.supported(lb, [p for p in lb.parameters() if p.requires_grad])


@pytest.mark.parametrize("bias", ["trainable", "frozen"])
def test_book_keeping_equals_the_reference_with_cosine_routing(bias):
    """The routers' per-unit gradients come from one batched VJP through model/moe.router_logits,
    whatever that computes: here cosine logits, with the bias trained or frozen."""
    cfg = CFG.replace(router_cosine_temp=0.3)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    with torch.no_grad():
        for m in model.moe_layers():
            m.router.weight.normal_(0, 0.5)
            m.router.bias.uniform_(-0.5, 0.0)
    apply_freeze_plan(model, PLANS["expert_anchor"])
    if bias == "frozen":
        for m in model.moe_layers():
            m.router.bias.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert ghost.supported(model, params) is None
    masks, batch, units = trainable_masks(params), _batch(), UNITS["document"]
    raw = list(clipped_sample_grads(model, batch, params, float("inf"), masks, unit_of_window=units))
    clip = float(np.median([n for _, n, _ in raw]))
    got, norms, _ = ghost.book_keeping_grads(model, batch, units, 4, params, clip, masks)
    np.testing.assert_allclose(norms.numpy(), [n for _, n, _ in raw], rtol=1e-5)
    ref = [sum(gs[j] for gs, _, _ in clipped_sample_grads(model, batch, params, clip, masks, unit_of_window=units))
           for j in range(len(params))]
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("keep_bytes", [ghost.KEEP_BYTES, 12_000, 2_000])
def test_unit_norms_batched_in_chunks_equal_a_loop_over_units(monkeypatch, keep_bytes):
    """_unit_sq_norms on rows out of unit order, of uneven counts (one unit empty), by the ghost
    norm (few rows) and the materialised product (many), in one chunk or in chunks of few units;
    and the per-unit products it keeps for the clipped sum when every unit was materialised."""
    monkeypatch.setattr(ghost, "KEEP_BYTES", keep_bytes)
    gen = torch.Generator().manual_seed(0)
    counts = [3, 0, 40, 7, 40, 1, 25]  # 24 + 16 columns: more than 9 rows are materialised
    unit_N = torch.tensor([u for u, n in enumerate(counts) for _ in range(n)])
    unit_N = unit_N[torch.randperm(len(unit_N), generator=gen)]
    G, A = torch.randn(len(unit_N), 24, generator=gen), torch.randn(len(unit_N), 16, generator=gen)
    want = torch.stack([G[unit_N == u].T @ A[unit_N == u] for u in range(len(counts))])
    norms, kept = ghost._unit_sq_norms(G, A, unit_N, len(counts))
    torch.testing.assert_close(norms, want.double().square().sum((1, 2)), rtol=1e-6, atol=0)
    assert kept is None
    many = (unit_N == 2) | (unit_N == 4) | (unit_N == 6)
    norms, kept = ghost._unit_sq_norms(G[many], A[many], unit_N[many], len(counts))
    want[[0, 1, 3, 5]] = 0
    torch.testing.assert_close(norms, want.double().square().sum((1, 2)), rtol=1e-6, atol=0)
    if len(counts) * want[0].numel() * 4 <= keep_bytes:
        torch.testing.assert_close(kept, want, rtol=1e-6, atol=1e-6)
    else:
        assert kept is None
