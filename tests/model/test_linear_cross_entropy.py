"""Chunked linear + cross-entropy (model/loss.py): the same loss and gradients as the full
logits path, through the Transformer too, while holding a fraction of the logits' memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from flexmoe.config import ModelConfig
from flexmoe.model import Transformer
from flexmoe.model.loss import IGNORE_INDEX, chunk_tokens_for, cross_entropy_from_logits, linear_cross_entropy


def _full(h_ND, w_VD, t_N, mask_N=None, reduction="mean"):
    """The old path: every logit at once, cross-entropy in fp32."""
    return cross_entropy_from_logits(F.linear(h_ND, w_VD), t_N, loss_mask_N=mask_N, reduction=reduction)


def _problem(N=37, D=8, V=50, seed=0, ignore=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore:
        t[::5] = IGNORE_INDEX
    mask = (torch.rand(N, generator=g) > 0.4).float()
    return h, w, t, mask


def _loss_and_grads(fn, h, w, *args, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fn(h, w, *args, **kw)
    # a per-token output gets a non-uniform upstream gradient, as a weighted sum would give it
    (loss * torch.linspace(0.5, 1.5, loss.numel()).view_as(loss)).sum().backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "mask"])
@pytest.mark.parametrize("ignore", [False, True], ids=["", "ignore"])
@pytest.mark.parametrize("chunk", [7, 37, None], ids=["chunk7", "chunk37", "default"])
def test_matches_full_logits_fp32(reduction, masked, ignore, chunk):
    h, w, t, mask = _problem(ignore=ignore)
    m = mask if masked else None
    ref = _loss_and_grads(_full, h, w, t, m, reduction)
    got = _loss_and_grads(linear_cross_entropy, h, w, t, loss_mask_N=m, reduction=reduction, chunk_tokens=chunk)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if masked:  # a masked target's hidden state gets exactly no gradient
        assert got[1][mask == 0].abs().max() == 0


def test_matches_plain_cross_entropy_and_shapes():
    h, w, t, _ = _problem(ignore=True)
    h_BSD, t_BS = h[:36].view(4, 9, -1), t[:36].view(4, 9)
    ref = F.cross_entropy(F.linear(h_BSD, w).float().flatten(0, 1), t_BS.flatten())  # ignore_index=-100
    torch.testing.assert_close(linear_cross_entropy(h_BSD, w, t_BS, chunk_tokens=5), ref, rtol=1e-6, atol=1e-6)
    assert linear_cross_entropy(h_BSD, w, t_BS, reduction="none").shape == (4, 9)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="avg")


def test_bf16_autocast_close_to_full():
    h, w, t, mask = _problem(N=64, D=32, V=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _loss_and_grads(_full, h, w, t, mask)
        got = _loss_and_grads(linear_cross_entropy, h, w, t, loss_mask_N=mask, chunk_tokens=16)
    assert got[2].dtype == torch.float32  # the fp32 parameter's gradient, as autocast gives it
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def _peak_bytes(fn) -> int:
    """Peak of live CPU allocations (bytes above the start) while `fn` runs, from the profiler's
    allocation events in time order."""
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes: list[tuple[int, int]] = []

    def walk(ev):
        if ev.tag == _EventType.Allocation:
            sizes.append((ev.start_time_ns, ev.extra_fields.alloc_size))
        for child in ev.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(sizes):
        live += size
        peak = max(peak, live)
    return peak


def test_holds_a_fraction_of_the_logits():
    N, D, V = 2048, 64, 50_000
    g = torch.Generator().manual_seed(0)
    h0, w0 = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g) * 0.05
    t = torch.randint(0, V, (N,), generator=g)
    logits_bytes = N * V * 4
    results = {}
    for name, fn in (("full", _full), ("chunked", linear_cross_entropy)):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()

        def step():
            loss = fn(h, w, t)
            loss.backward()
            results[name] = (loss.detach(), h.grad, w.grad)

        peak = _peak_bytes(step)
        results[name + "_peak"] = peak
    print(f"peak: full {results['full_peak'] / logits_bytes:.2f}x, chunked {results['chunked_peak'] / logits_bytes:.3f}x "
          f"of the logits ({logits_bytes / 1e6:.0f} MB); {chunk_tokens_for(V)} tokens per chunk")
    assert results["full_peak"] >= 2 * logits_bytes  # the measure sees the logits and their softmax
    assert results["chunked_peak"] < logits_bytes / 4
    for a, b in zip(results["chunked"], results["full"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

    # between forward and backward, the loss keeps per-token numbers only (inputs are referenced)
    h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    kept: dict[int, int] = {}
    inputs = {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}

    def pack(x):
        if x.untyped_storage().data_ptr() not in inputs:
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        linear_cross_entropy(h, w, t)
    assert sum(kept.values()) <= 32 * N


def _tiny(moe: bool):
    cfg = ModelConfig(vocab_size=97, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48)
    if moe:
        cfg = cfg.replace(num_experts=2, top_k=2)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    return model


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("masked", [False, True], ids=["lm", "sft"])
def test_transformer_loss_matches_logits_path(moe, masked):
    tokens = torch.randint(0, 97, (3, 17), generator=torch.Generator().manual_seed(1))
    mask = (torch.rand(3, 16, generator=torch.Generator().manual_seed(2)) > 0.5).float() if masked else None
    grads = []
    for chunked in (False, True):
        model = _tiny(moe)
        if chunked:
            out = model(tokens[:, :-1], targets=tokens[:, 1:], loss_mask=mask)
            assert out.logits is None
            loss = out.loss
        else:
            loss = cross_entropy_from_logits(model(tokens[:, :-1]).logits, tokens[:, 1:], loss_mask_N=mask)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref), (loss, got) = grads
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert got.keys() == ref.keys() and "lm_head.weight" in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-5, msg=n)


def test_transformer_keeps_full_logits_for_a_gathered_only_head():
    """A ZeRO-3 head (weights gathered only inside lm_head's forward; DTensor heads alike) takes
    the old path through the module, with the same loss."""
    model = _tiny(False)
    tokens = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    chunked = model(tokens[:, :-1], targets=tokens[:, 1:], loss_reduction="sum")
    model.lm_head.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    full = model(tokens[:, :-1], targets=tokens[:, 1:], loss_reduction="sum")
    assert chunked.logits is None and full.logits is not None and full.logits.shape == (2, 8, 97)
    torch.testing.assert_close(full.loss, chunked.loss, rtol=1e-5, atol=1e-5)
