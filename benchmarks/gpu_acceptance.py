#!/usr/bin/env python3
"""GPU acceptance (issue 15, point 9): one script a machine with an NVIDIA GPU runs in a few minutes.

    PYTHONPATH=src python benchmarks/gpu_acceptance.py [--steps 30] [--json out.json]
    PYTHONPATH=src python benchmarks/gpu_acceptance.py --cpu-smoke      # toy sizes on the CPU (the test)

1. Parity, on a small model: grouped-GEMM experts against the per-expert loop (forward and the
   trainable expert's gradients), flash-attn against SDPA when flash-attn imports, and a bf16-autocast
   loss curve against fp32 over the same steps (within 1%).
2. Throughput: anchor-recipe training (shared layers and expert 0 frozen, expert 1 and its router row
   train) of a ~1B-active 2-expert model in bf16 autocast with grouped GEMM, torch's fused AdamW and
   (if installed) flash-attn: tokens/s, MFU against the device's dense bf16 peak, peak memory.
Prints one table and writes a JSON summary; exit code 1 when a parity check fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flexmoe.config import ModelConfig  # noqa: E402
from flexmoe.config.train import OptimConfig  # noqa: E402
from flexmoe.model import Transformer  # noqa: E402
from flexmoe.model.attention import flash_attn_available  # noqa: E402
from flexmoe.model.flops import flops_per_token  # noqa: E402
from flexmoe.train.freeze import PLANS, apply_freeze_plan  # noqa: E402
from flexmoe.train.hardware import describe_machine  # noqa: E402
from flexmoe.train.optim import build_optimizer  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by device name.
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS.items() if k in name), None)


def sizes(smoke: bool) -> tuple[ModelConfig, ModelConfig, int, int]:
    """(the throughput model, the parity model, batch, seq)."""
    if smoke:
        big = ModelConfig(vocab_size=512, d_model=64, num_layers=2, num_heads=4, d_ff=128, num_experts=2, top_k=2,
                          max_seq_len=64)
        return big, big, 4, 64
    # ~1.2B parameters, all active (2 experts, top-2): 12 layers of d_model 2048, expert d_ff 5504
    big = ModelConfig(vocab_size=50304, d_model=2048, num_layers=12, num_heads=16, d_ff=5504, num_experts=2,
                      top_k=2, max_seq_len=2048)
    small = ModelConfig(vocab_size=4096, d_model=512, num_layers=2, num_heads=8, d_ff=1024, num_experts=2, top_k=2,
                        max_seq_len=512)
    return big, small, 8, 2048


def _twin(cfg: ModelConfig, device, seed: int = 0, **impl) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg.replace(**impl))
    m.reset_parameters(seed=seed)
    apply_freeze_plan(m, PLANS["expert_anchor"])
    return m.to(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def parity_grouped_vs_loop(cfg, device, dtype, batch, seq) -> dict:
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    out = {}
    for impl in ("grouped", "loop"):
        m = _twin(cfg, device, moe_impl=impl)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = m(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        grads = [p.grad.detach().clone() for p in m.parameters() if p.requires_grad]
        out[impl] = (loss.detach(), grads)
    worst = max(_rel(g, h) for g, h in zip(out["grouped"][1], out["loop"][1]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return {"check": f"grouped vs loop ({str(dtype).removeprefix('torch.')})", "loss_rel": _rel(out["grouped"][0], out["loop"][0]),
            "grad_rel_max": worst, "tolerance": tol, "ok": worst <= tol and _rel(out["grouped"][0], out["loop"][0]) <= tol}


def parity_flash_vs_sdpa(cfg, device, batch, seq) -> dict:
    if not (flash_attn_available() and device.type == "cuda"):
        return {"check": "flash-attn vs SDPA", "ok": None, "skipped": "flash-attn not installed (or no CUDA)"}
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    logits = {}
    for impl in ("flash", "sdpa"):
        m = _twin(cfg, device, attn_impl=impl)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            logits[impl] = m(tokens).logits.float()
    rel = _rel(logits["flash"], logits["sdpa"])
    return {"check": "flash-attn vs SDPA (bf16 logits)", "rel": rel, "tolerance": 2e-2, "ok": rel <= 2e-2}


def _train_losses(cfg, device, dtype, steps, batch, seq) -> list[float]:
    m = _twin(cfg, device)
    opt = build_optimizer(m, OptimConfig(lr=1e-3, weight_decay=0.0))
    g = torch.Generator(device="cpu").manual_seed(1)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = m(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def parity_bf16_curve(cfg, device, steps, batch, seq) -> dict:
    fp32 = _train_losses(cfg, device, torch.float32, steps, batch, seq)
    bf16 = _train_losses(cfg, device, torch.bfloat16, steps, batch, seq)
    worst = max(abs(a - b) / abs(b) for a, b in zip(bf16, fp32))
    return {"check": f"bf16 loss curve vs fp32 ({steps} steps)", "rel_max": worst, "tolerance": 0.01,
            "ok": worst <= 0.01, "fp32_first_last": [fp32[0], fp32[-1]], "bf16_first_last": [bf16[0], bf16[-1]]}


def throughput(cfg, device, dtype, steps, batch, seq) -> dict:
    m = _twin(cfg, device, moe_impl="grouped" if device.type == "cuda" else "auto")
    opt = build_optimizer(m, OptimConfig(lr=1e-4))
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup, times = 3, []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = m(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    tps = batch * seq / (sum(times) / len(times))
    fpt = flops_per_token(cfg, seq, training=True)
    peak = device_peak(device)
    params = sum(p.numel() for p in m.parameters())
    return {"params": params, "trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
            "tokens_per_s": tps, "step_s": sum(times) / len(times),
            "mfu": tps * fpt / peak if peak else None, "peak_flops": peak,
            "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            "flash_attn": flash_attn_available() and device.type == "cuda", "last_loss": float(loss)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="toy sizes on the CPU (what the test runs)")
    p.add_argument("--steps", type=int, default=30, help="timed training steps")
    p.add_argument("--curve-steps", type=int, default=20, help="steps of the bf16-vs-fp32 loss curve")
    p.add_argument("--json", default="gpu_acceptance.json", help="summary file")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() and not a.cpu_smoke:
        print("gpu_acceptance: error: no CUDA device; run on a GPU machine, or pass --cpu-smoke", file=sys.stderr)
        return 2
    device = torch.device("cpu") if a.cpu_smoke else torch.device("cuda", 0)
    big, small, batch, seq = sizes(a.cpu_smoke)
    pb, ps = (2, 32) if a.cpu_smoke else (4, 512)
    machine = describe_machine()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else machine['cpu']}; torch "
          f"{torch.__version__}; python {platform.python_version()}")
    # grouped_mm runs in bf16 on CUDA; on the CPU also in fp32, where the two paths must agree to 1e-5
    checks = [parity_grouped_vs_loop(small, device, torch.float32 if a.cpu_smoke else torch.bfloat16, pb, ps)]
    checks.append(parity_flash_vs_sdpa(small, device, pb, ps))
    checks.append(parity_bf16_curve(small, device, a.curve_steps, pb, ps))
    run = throughput(big, device, torch.float32 if a.cpu_smoke else torch.bfloat16, a.steps, batch, seq)
    for c in checks:
        state = "skip" if c["ok"] is None else "ok" if c["ok"] else "FAIL"
        detail = {k: v for k, v in c.items() if k not in ("check", "ok")}
        print(f"  [{state:>4}] {c['check']}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in detail.items()))
    mfu = f"{run['mfu']:.1%}" if run["mfu"] is not None else "n/a (unknown peak)"
    mem = f"{run['peak_mem_gib']:.1f} GiB" if run["peak_mem_gib"] is not None else "n/a"
    print(f"| model | params | trainable | batch x seq | tokens/s | step s | MFU | peak memory |\n|---|---|---|---|---|---|---|---|\n"
          f"| {big.num_layers}L d{big.d_model} 2 experts | {run['params'] / 1e9:.2f}B | {run['trainable'] / 1e9:.2f}B | "
          f"{batch} x {seq} | {run['tokens_per_s']:,.0f} | {run['step_s']:.3f} | {mfu} | {mem} |")
    summary = {"device": str(device), "machine": machine, "checks": checks, "throughput": run,
               "torch": torch.__version__}
    Path(a.json).write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return 1 if any(c["ok"] is False for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
