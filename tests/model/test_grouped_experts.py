"""GroupedExperts: the grouped-GEMM path against the per-expert loop, with and without frozen
slots, and what it costs: no weight gradient and no saved copy for frozen experts, no host sync.

`_concat_reference` is the previous grouped path (frozen and trainable stacks concatenated
every step); the cost tests run it too, so each counter is shown to catch that waste."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from flexmoe.config import ModelConfig
from flexmoe.model.moe import EXPERT_WEIGHTS, FROZEN_SUFFIX, GroupedExperts, MoE

D, FF = 16, 24


def _experts(E: int, nf: int, impl: str, seed: int = 0, d_ff: int = FF, dtype=torch.float32,
             d_model: int = D) -> GroupedExperts:
    torch.manual_seed(seed)
    ex = GroupedExperts(E, d_model, d_ff, impl)
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ex.freeze_leading(nf)
    return ex.to(dtype)


def _run(ex: GroupedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor, g_ND: torch.Tensor):
    x = x_ND.detach().clone().requires_grad_()
    y = ex(x, counts_E)
    y.backward(g_ND)
    return y.detach(), x.grad, {n: p.grad for n, p in ex.named_parameters()}


def _concat_reference(ex: GroupedExperts, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """The old grouped path: `torch.cat([frozen, trainable])` of every weight, every step."""
    offs = counts_E.cumsum(0, dtype=torch.int32)
    w = [torch.cat([getattr(ex, n + FROZEN_SUFFIX), getattr(ex, n)]).transpose(-2, -1) for n in EXPERT_WEIGHTS]
    h = F.silu(F.grouped_mm(x_ND, w[0], offs=offs)) * F.grouped_mm(x_ND, w[1], offs=offs)
    return F.grouped_mm(h, w[2], offs=offs)


CASES = [  # (experts, frozen, tokens per expert): zero-token experts frozen and trainable
    (2, 0, [6, 0]),
    (2, 1, [4, 3]),
    (2, 1, [0, 5]),
    (2, 1, [5, 0]),
    (4, 1, [5, 0, 7, 3]),
    (4, 1, [0, 4, 0, 2]),
    (4, 0, [0, 3, 0, 4]),
    (4, 4, [2, 0, 3, 1]),
    (2, 0, [0, 0]),  # an ep rank that received no tokens
    (2, 1, [0, 0]),
]


@pytest.mark.parametrize("E,nf,counts", CASES)
def test_grouped_matches_loop_fp32(E, nf, counts):
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1))
    g = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2))
    y_g, dx_g, dw_g = _run(_experts(E, nf, "grouped"), x, counts_E, g)
    y_l, dx_l, dw_l = _run(_experts(E, nf, "loop"), x, counts_E, g)
    torch.testing.assert_close(y_g, y_l, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_g, dx_l, rtol=1e-5, atol=1e-5)
    assert dw_g.keys() == dw_l.keys()
    for name, grad in dw_l.items():
        if name.endswith(FROZEN_SUFFIX):
            assert grad is None and dw_g[name] is None, name
        else:  # a trainable expert without tokens gets an exact zero gradient from both paths
            torch.testing.assert_close(dw_g[name], grad, rtol=1e-5, atol=1e-5)
    if E - nf and 0 in counts[nf:]:
        empty = counts[nf:].index(0)
        assert dw_g["gate_proj"][empty].abs().max() == 0


def test_moe_layer_grouped_matches_loop():
    """Through the router and the sort-based dispatch, anchor frozen, top-2 of 4."""
    cfg = ModelConfig(d_model=D, num_heads=2, d_ff=FF, num_experts=4, top_k=2, moe_impl="grouped")
    outs = []
    for impl in ("grouped", "loop"):
        torch.manual_seed(0)
        moe = MoE(cfg.replace(moe_impl=impl))
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.3)
        moe.experts.freeze_leading(1)
        x = torch.randn(2, 8, D, generator=torch.Generator().manual_seed(3), requires_grad=True)
        moe(x).pow(2).sum().backward()
        outs.append([x.grad] + [p.grad for p in moe.parameters() if p.requires_grad])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("E,nf,counts", [(2, 1, [5, 3]), (4, 1, [5, 0, 7, 3]), (4, 0, [3, 3, 0, 2])])
def test_grouped_bf16_close_to_loop(E, nf, counts):
    counts_E = torch.tensor(counts)
    x = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(1)).bfloat16()
    g = torch.randn(sum(counts), D, generator=torch.Generator().manual_seed(2)).bfloat16()
    y_g, dx_g, dw_g = _run(_experts(E, nf, "grouped", dtype=torch.bfloat16), x, counts_E, g)
    y_l, dx_l, dw_l = _run(_experts(E, nf, "loop", dtype=torch.bfloat16), x, counts_E, g)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_g.float(), y_l.float(), **tol)
    torch.testing.assert_close(dx_g.float(), dx_l.float(), **tol)
    torch.testing.assert_close(dw_g["down_proj"].float(), dw_l["down_proj"].float(), **tol)


class _WeightGradSlots(TorchDispatchMode):
    """Counts expert slots whose weight gradient a grouped GEMM computes: in backward, the
    grouped_mm calls with a 3-D `[G, ., .]` output are weight gradients, one per slot."""

    def __init__(self):
        super().__init__()
        self.slots = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._grouped_mm.default and out.dim() == 3:
            self.slots += out.shape[0]
        return out


@pytest.mark.parametrize("E,nf", [(2, 1), (4, 1), (4, 2)])
def test_frozen_slots_get_no_weight_gradient(E, nf):
    counts_E = torch.tensor([3] * E)
    x = torch.randn(3 * E, D, requires_grad=True)
    ex = _experts(E, nf, "grouped")
    y = ex(x, counts_E)
    # (a materialised output gradient: grouped_mm's backward rejects the stride-0 one of .sum())
    with _WeightGradSlots() as mode:
        y.pow(2).sum().backward()
    assert mode.slots == 3 * (E - nf)  # gate, up, down of each trainable slot, nothing more
    y_old = _concat_reference(ex, x, counts_E)
    with _WeightGradSlots() as old:
        y_old.pow(2).sum().backward()
    assert old.slots == 3 * E  # the concatenating path differentiates the frozen slots as well


def _saved_bytes(fn, params) -> int:
    """Bytes autograd keeps for backward, counting each storage once and the parameters' own
    storages (kept by reference, not copied) not at all."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_saved_memory_does_not_copy_frozen_weights():
    E, nf, d_model, d_ff, N = 2, 1, 64, 512, 8
    ex = _experts(E, nf, "grouped", d_ff=d_ff, d_model=d_model)
    counts_E = torch.tensor([5, 3])
    x = torch.randn(N, d_model, requires_grad=True)
    frozen_bytes = sum(getattr(ex, n + FROZEN_SUFFIX).nbytes for n in EXPERT_WEIGHTS)
    new = _saved_bytes(lambda: ex(x, counts_E), ex.parameters())
    old = _saved_bytes(lambda: _concat_reference(ex, x, counts_E), ex.parameters())
    lp = _experts(E, nf, "loop", d_ff=d_ff, d_model=d_model)
    loop = _saved_bytes(lambda: lp(x, counts_E), lp.parameters())
    print(f"saved for backward: {new} B, loop {loop} B, concatenating path {old} B, frozen weights {frozen_bytes} B")
    # Activations only: the input, gate and up outputs (N rows each) and the token counts.
    activation_bytes = N * (d_model + 2 * d_ff) * 4
    assert activation_bytes <= new <= activation_bytes + 256 < frozen_bytes
    assert new < loop  # the loop keeps silu(gate) and the SwiGLU product too
    assert old >= frozen_bytes  # the concatenated weights, frozen part included, are saved


def test_grouped_path_does_not_read_counts_on_the_host():
    """On the meta device every value read (`.tolist()`, `.item()`, data-dependent shapes) raises,
    so a forward and backward there show that the dispatch never waits for the device."""
    E, nf = 4, 1
    ex = _experts(E, nf, "grouped").to("meta", torch.bfloat16)
    x = torch.empty(9, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    counts_E = torch.empty(E, device="meta", dtype=torch.long)
    y = ex(x, counts_E)
    y.pow(2).sum().backward()
    assert y.shape == (9, D) and ex.gate_proj.grad.shape == (E - nf, FF, D)
    with pytest.raises(NotImplementedError):  # the loop splits by host-side counts
        _experts(E, nf, "loop").to("meta", torch.bfloat16)(x, counts_E)


def test_impl_choice():
    ex = _experts(2, 1, "auto")
    assert not ex._use_grouped(torch.zeros(1, D))  # CPU: the loop is faster (see moe.py)
    assert _experts(2, 1, "grouped")._use_grouped(torch.zeros(1, D))
    assert _experts(2, 1, "grouped", dtype=torch.bfloat16)._use_grouped(torch.zeros(1, D, dtype=torch.bfloat16))
    odd = GroupedExperts(2, 12, 20, "grouped")
    with pytest.raises(ValueError, match="multiples of 16 bytes"):
        odd._use_grouped(torch.zeros(1, 12, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        odd._use_grouped(torch.zeros(1, 12, dtype=torch.float64))


@pytest.mark.parametrize("nf", [0, 1])
def test_no_tokens_still_gives_zero_weight_gradients(nf):
    """An ep rank can receive no token; its trainable weights still get a (zero) gradient, even
    from an expanded upstream gradient (what `.sum()` hands back)."""
    ex = _experts(2, nf, "grouped")
    y = ex(torch.zeros(0, D, requires_grad=True), torch.zeros(2, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, D)
    assert ex.gate_proj.grad.shape == (2 - nf, FF, D) and ex.gate_proj.grad.abs().max() == 0
