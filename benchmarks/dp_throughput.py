#!/usr/bin/env python3
"""DP-SGD's cost against ordinary training, on one model and one batch (issue 17).

    PYTHONPATH=src python benchmarks/dp_throughput.py [--d-model 128 --layers 4 --seq 256 --batch 16 ...]

The defaults are the quickstart's expert run: the tiny byte-level model (d_model 128, 4 layers,
d_ff 512) branched to 2 experts, `stage.freeze=expert_anchor`, 16 windows of 256 tokens of real
text (Python's standard library sources), window units. Three cases, each an optimizer step
(AdamW) on the same batch:

- non-private: one forward and backward of the batch's mean loss;
- DP, book-keeping: per-window norms and the clipped sum from one forward and one backward
  (train/ghost.py), then noise;
- DP, reference: one backward per window (train/privacy.py's per_unit_backward), then noise.

Rounds interleave the cases and each keeps its fastest step, so another job's burst on a shared
machine costs a few steps rather than one case. Prints the CPU, then tokens/s per case and each
as a ratio to non-private ("0.NNx non-private").
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flexmoe.config import ModelConfig  # noqa: E402
from flexmoe.config.train import OptimConfig  # noqa: E402
from flexmoe.model import Transformer  # noqa: E402
from flexmoe.train.freeze import PLANS, apply_freeze_plan  # noqa: E402
from flexmoe.train.hardware import cpu_name  # noqa: E402
from flexmoe.train.optim import build_optimizer  # noqa: E402
from flexmoe.train.privacy import private_gradient, trainable_masks  # noqa: E402


def text_batch(batch: int, seq: int, vocab: int) -> torch.Tensor:
    """`[batch, seq + 1]` byte tokens of the standard library's sources (present on every machine)."""
    need = batch * (seq + 1)
    raw = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        raw += path.read_bytes()
        if len(raw) >= need:
            break
    return (torch.tensor(list(raw[:need]), dtype=torch.long) % vocab).view(batch, seq + 1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=5, help="timed steps per case and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = ModelConfig(vocab_size=258, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads, d_ff=a.d_ff,
                      num_experts=2, top_k=2, max_seq_len=max(1024, a.seq), eos_token_id=256, pad_token_id=257)
    model = Transformer(cfg)
    model.reset_parameters(seed=0)
    apply_freeze_plan(model, PLANS["expert_anchor"])
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    masks = trainable_masks(params)
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    batch = text_batch(a.batch, a.seq, cfg.vocab_size)
    gen = torch.Generator().manual_seed(0)

    def nonprivate() -> None:
        logits = model(batch[:, :-1]).logits.float()
        F.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def private(clipping: str):
        def step() -> None:
            grads, stats = private_gradient(model, batch, params, max_grad_norm=1.0, noise_multiplier=1.0,
                                            expected_batch_size=float(a.batch), generator=gen, masks=masks,
                                            clipping=clipping)
            assert stats["clipping"] == clipping
            for q, g in zip(params, grads):
                q.grad = g
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    cases = {"non-private": nonprivate, "DP, book-keeping": private("book_keeping"),
             "DP, reference (one backward per window)": private("per_unit_backward")}
    best = {name: float("inf") for name in cases}
    for name, fn in cases.items():  # warm-up
        fn()
    for _ in range(a.rounds):
        for name, fn in cases.items():
            for _ in range(a.steps):
                t = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t)
    tokens = a.batch * a.seq
    print(f"machine: {cpu_name()}, {a.threads} torch threads, fp32, torch {torch.__version__}")
    print(f"model: d_model {a.d_model}, {a.layers} layers, d_ff {a.d_ff}, 2 experts (expert_anchor: "
          f"{sum(q.numel() for q in params):,} trainable); batch {a.batch} x seq {a.seq}, window units; "
          f"fastest of {a.steps} steps in {a.rounds} rounds")
    print(f"{'case':<42}{'tokens/s':>10}{'s/step':>9}{'vs non-private':>16}")
    base = tokens / best["non-private"]
    for name, dt in best.items():
        print(f"{name:<42}{tokens / dt:>10,.0f}{dt:>9.3f}{tokens / dt / base:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
