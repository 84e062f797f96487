#!/usr/bin/env python3
"""Training throughput on one device: flexmoe against Hugging Face FlexOlmoForCausalLM, and the
anchor recipe (shared layers + expert 0 frozen) against training every parameter.

    PYTHONPATH=src python benchmarks/train_throughput.py [--d-model 256 --layers 4 --seq 256 ...]

Every case trains the same model (HF gets our weights through convert.hf) on the same batch with
the same loss and AdamW, in a fresh process of its own, so the peak memory of one case is not
inherited by the next. Prints one table: tokens/s, MFU against this CPU's fp32 peak (a large
matmul timed before and after the cases), time per step, and peak memory (the process's peak
resident set, and its growth over the resident set once the model and optimizer are built).

A second table (skip it with --build-ranks 0) is the trainer's memory per rank when it starts an
`expert_anchor` run from an `init_from` model on --build-ranks gloo ranks (FSDP): the old build
(FLEXMOE_FULL_BUILD=1: the whole file read and a full fp32 model built on every rank, then
sharded) against the meta-device build that loads only each rank's shards. Each rank's peak
resident set (VmHWM, reset just before `train()`) above its resident set at that moment, over the
model's fp32 bytes, for the whole run: build, --build-steps steps and the final save.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from flexmoe.config import ModelConfig  # noqa: E402
from flexmoe.config.train import OptimConfig  # noqa: E402
from flexmoe.train.freeze import PLANS, apply_freeze_plan  # noqa: E402
from flexmoe.train.hardware import cpu_has_fast_bf16, cpu_name  # noqa: E402
from flexmoe.model import Transformer  # noqa: E402
from flexmoe.model.flops import flops_per_token  # noqa: E402
from flexmoe.train.metrics import peak_memory_gib  # noqa: E402
from flexmoe.train.optim import build_optimizer  # noqa: E402

CASES = {  # name -> (implementation, freeze plan)
    "flexmoe": ("flexmoe", "none"),
    "hf": ("hf", "none"),
    "flexmoe_anchor": ("flexmoe", "expert_anchor"),
}


def model_config(a) -> ModelConfig:
    return ModelConfig(vocab_size=a.vocab, d_model=a.d_model, num_layers=a.layers, num_heads=a.heads,
                       d_ff=a.d_ff, num_experts=a.experts, top_k=a.top_k, max_seq_len=a.seq)


def hf_model(cfg: ModelConfig, ours: Transformer):
    import transformers

    from flexmoe.convert.hf import fuse_experts, hf_config, native_to_hf

    kw = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hc = transformers.FlexOlmoConfig(**kw)
    hc._attn_implementation = "sdpa"  # what ours uses on CPU
    model = transformers.FlexOlmoForCausalLM(hc)
    missing, unexpected = model.load_state_dict(fuse_experts(native_to_hf(ours.state_dict(), cfg), cfg), strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def _resident_gib() -> float:
    """Resident memory now (the peak, ru_maxrss, also counts transient copies made while building)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_case(a, name: str) -> dict:
    """One case in this process: build, warm up, time `a.steps` optimizer steps."""
    torch.set_num_threads(a.threads)
    impl, freeze = CASES[name]
    cfg = model_config(a)
    torch.manual_seed(0)
    ours = Transformer(cfg)
    ours.reset_parameters(seed=0)
    model = hf_model(cfg, ours) if impl == "hf" else ours
    if impl == "flexmoe":
        apply_freeze_plan(model, PLANS[freeze])
    model.train()
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    batch = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), generator=torch.Generator().manual_seed(1))
    inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)
    params = [p for p in model.parameters() if p.requires_grad]
    del ours
    gc.collect()
    baseline = _resident_gib()

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if a.dtype == "bf16" else contextlib.nullcontext()

    def step() -> float:
        with autocast:  # bf16 autocast, as trainer.dtype=bf16 runs it
            out = model(inputs) if impl == "flexmoe" else model(input_ids=inputs)
        loss = F.cross_entropy(out.logits.float().reshape(-1, cfg.vocab_size), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    times, losses = [], []
    for _ in range(a.steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    # The fastest step: on a shared machine the others are slowed by whatever else runs.
    dt = min(times)
    frac = (cfg.num_experts - PLANS[freeze].frozen_experts) / cfg.num_experts
    # Same FLOPs count for both implementations of one model (MFU compares like with like);
    # the anchor recipe skips weight gradients of everything frozen.
    fpt = flops_per_token(cfg, a.seq, training=True, trainable_expert_fraction=frac if freeze != "none" else None,
                          shared_trainable=freeze == "none")
    mem = peak_memory_gib(torch.device("cpu"))
    return {"case": name, "step_s": dt, "tokens_per_s": a.batch * a.seq / dt, "flops_per_token": fpt,
            "peak_mem_gib": mem, "mem_growth_gib": mem - baseline, "first_loss": losses[0],
            "trainable": sum(p.numel() for p in params)}


BUILD_CASES = {"old build (full model per rank)": "1", "meta-device build (local shards)": "0"}


def _vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def build_model_config(a) -> ModelConfig:
    return ModelConfig(vocab_size=258, d_model=a.build_d_model, num_layers=a.build_layers, num_heads=8,
                       d_ff=a.build_d_ff, num_experts=2, top_k=2)


def build_rank(a) -> None:
    """One rank of a build-memory case (under torch.distributed.run): train, write this rank's peaks."""
    import ctypes

    from omegaconf import OmegaConf

    from flexmoe.config.train import RunConfig
    from flexmoe.train.trainer import train

    # glibc returns freed large blocks at once, so the high-water mark measures what the run
    # needs rather than what the allocator keeps (as tests/parallel/test_sharded_memory.py does)
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    root, rank = Path(a.build_root), int(os.environ.get("RANK", "0"))
    cfg = OmegaConf.structured(RunConfig)
    cfg.out_dir, cfg.init_from = str(root / f"run-{a.build_rank}"), str(root / "init")
    cfg.data.train = {"code": str(root / "train")}
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg.data.update(seq_len=16, batch_size=max(1, 4 // world))
    cfg.trainer.update(steps=a.build_steps, log_every=1, threads=1, dtype="fp32")
    cfg.optim.update(lr=3e-3, warmup_steps=1)
    cfg.stage.update(freeze="expert_anchor", name="expert_anchor")
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _vm("VmRSS")
    train(cfg)
    (root / f"{a.build_rank}-rank{rank}.json").write_text(json.dumps({"base": base, "peak": _vm("VmHWM")}))


def build_memory(a) -> list[tuple[str, list[float], float]]:
    """(case, per-rank peak growth / fp32 model bytes, wall seconds) of each build path."""
    import shutil
    import sysconfig
    import tempfile

    from flexmoe.data import ByteTokenizer, prepare_data
    from flexmoe.io.model_dir import save_model_dir

    cfg = build_model_config(a)
    root = Path(tempfile.mkdtemp(prefix="flexmoe-build-mem-"))
    try:
        prepare_data(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("[a-c]*.py"))[:4], root / "train",
                     ByteTokenizer(), progress=False)
        model = Transformer(cfg)
        model.reset_parameters(seed=0)
        fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
        save_model_dir(root / "init", cfg, model.state_dict(), {"kind": "moe"})
        del model
        rows = []
        for name, full in BUILD_CASES.items():
            tag = "old" if full == "1" else "new"
            env = dict(os.environ, FLEXMOE_FULL_BUILD=full, FLEXMOE_QUIET="1", OMP_NUM_THREADS="1")
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                f"--nproc-per-node={a.build_ranks}", __file__, *sys.argv[1:], "--build-rank", tag,
                                "--build-root", str(root)], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode != 0:
                raise SystemExit(f"{name}: failed\n{r.stderr[-3000:]}")
            per = [json.loads((root / f"{tag}-rank{k}.json").read_text()) for k in range(a.build_ranks)]
            rows.append((name, [(p["peak"] - p["base"]) / fp32_bytes for p in per], wall))
        return rows, fp32_bytes
    finally:
        shutil.rmtree(root, ignore_errors=True)


def matmul_peak(threads: int, n: int = 2048, repeats: int = 8) -> float:
    """fp32 FLOP/s of a large matmul, best of `repeats`, measured now rather than read from
    metrics.py's cache: on a shared machine the peak and the cases must see the same load."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats + 2):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=2, help="2: FlexOlmo's anchor + one owner's expert")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of every case; the fastest counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--build-ranks", type=int, default=4, help="gloo ranks of the build-memory table (0: skip it)")
    p.add_argument("--build-d-model", type=int, default=512)
    p.add_argument("--build-layers", type=int, default=15)
    p.add_argument("--build-d-ff", type=int, default=4096)
    p.add_argument("--build-steps", type=int, default=2)
    p.add_argument("--dtypes", default="auto",
                   help="fp32, bf16 or fp32,bf16; auto: fp32, and bf16 too on CPUs with AMX / AVX512-BF16 (on "
                        "AVX2-only CPUs bf16 runs ~90x slower and the rows would take hours)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)  # internal
    p.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)  # internal: one case per process
    p.add_argument("--build-rank", choices=("old", "new"), help=argparse.SUPPRESS)  # internal: one rank of a case
    p.add_argument("--build-root", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.build_rank:
        build_rank(a)
        return 0
    if a.case:
        print(json.dumps(run_case(a, a.case)))
        return 0
    if torch.cuda.is_available():
        print("note: this script times the CPU path; GPU runs use the trainer's own log (tok/s/dev, mfu)")
    peak = matmul_peak(a.threads)
    dtypes = (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"]) if a.dtypes == "auto" else a.dtypes.split(",")
    if "bf16" not in dtypes:
        print("note: no bf16 rows: this CPU has no AMX / AVX512-BF16 (bf16 would run ~90x slower); "
              "--dtypes fp32,bf16 forces them")
    rows: dict[str, dict] = {}
    # Rounds interleave the cases and keep each one's fastest step: on a shared machine another
    # job's burst then costs a few steps, not one case.
    for _ in range(a.rounds):
        for dtype in dtypes:
            for name in CASES:
                r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--case", name, "--dtype", dtype],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    print(r.stderr[-3000:], file=sys.stderr)
                    return r.returncode
                row = json.loads(r.stdout.strip().splitlines()[-1])
                key = name if dtype == "fp32" else f"{name} bf16"
                if key not in rows or row["step_s"] < rows[key]["step_s"]:
                    rows[key] = row
    peak = max(peak, matmul_peak(a.threads))
    for r in rows.values():
        r["mfu"] = r["tokens_per_s"] * r["flops_per_token"] / peak
    cpu = f"{cpu_name()} (bf16 fast path: {'yes' if cpu_has_fast_bf16() else 'no'})"
    print(f"machine: {cpu}, {a.threads} torch threads, {'+'.join(dtypes)}, torch {torch.__version__}; "
          f"fp32 peak {peak / 1e9:.1f} GFLOP/s (2048^3 matmul, best before/after; bf16 rows' MFU is against it too)")
    print(f"model: d_model {a.d_model}, {a.layers} layers, {a.heads} heads, d_ff {a.d_ff}, {a.experts} experts "
          f"top-{a.top_k}, vocab {a.vocab}; batch {a.batch} x seq {a.seq}; fastest of {a.steps} steps "
          f"(after {a.warmup}) in {a.rounds} rounds")
    print(f"{'case':<21}{'tokens/s':>10}{'MFU':>8}{'s/step':>9}{'peak GiB':>10}{'growth GiB':>12}{'trainable':>12}")
    for name, r in rows.items():
        print(f"{name:<21}{r['tokens_per_s']:>10,.0f}{r['mfu']:>8.1%}{r['step_s']:>9.3f}{r['peak_mem_gib']:>10.2f}"
              f"{r['mem_growth_gib']:>12.2f}{r['trainable']:>12,}")
    ours, hf, anchor = rows["flexmoe"], rows["hf"], rows["flexmoe_anchor"]
    print(f"flexmoe / HF tokens/s: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x "
          f"(same first loss: {ours['first_loss']:.5f} vs {hf['first_loss']:.5f})")
    print(f"anchor recipe / all parameters: {anchor['step_s'] / ours['step_s']:.2f}x time per step, "
          f"{anchor['mem_growth_gib'] / max(ours['mem_growth_gib'], 1e-9):.2f}x memory growth")
    if "bf16" in dtypes:
        b_ours, b_hf, b_anchor = rows["flexmoe bf16"], rows["hf bf16"], rows["flexmoe_anchor bf16"]
        print(f"bf16: flexmoe / HF tokens/s {b_ours['tokens_per_s'] / b_hf['tokens_per_s']:.2f}x; bf16 / fp32 tokens/s: "
              f"flexmoe {b_ours['tokens_per_s'] / ours['tokens_per_s']:.2f}x, anchor recipe "
              f"{b_anchor['tokens_per_s'] / anchor['tokens_per_s']:.2f}x")
    if a.build_ranks > 0:
        rows, fp32_bytes = build_memory(a)
        bc = build_model_config(a)
        print(f"\nbuild memory: expert_anchor from init_from, FSDP over {a.build_ranks} gloo ranks, {a.build_steps} "
              f"steps + final save; model d_model {bc.d_model}, {bc.num_layers} layers, d_ff {bc.d_ff}, 2 experts "
              f"({fp32_bytes / 2**20:,.0f} MiB in fp32); peak RSS growth per rank / model fp32 bytes")
        print(f"{'build path':<36}{'per rank':>24}{'max':>8}{'wall s':>9}")
        for name, ratios, wall in rows:
            print(f"{name:<36}{' '.join(f'{x:.2f}x' for x in ratios):>24}{max(ratios):>7.2f}x{wall:>9.1f}")
        (_, old, _), (_, new, _) = rows
        print(f"meta-device build / old build, largest rank: {max(new) / max(old):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
