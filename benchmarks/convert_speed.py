"""Conversions against `cp` of the same bytes: wall time and peak resident memory, in one table.

    PYTHONPATH=src python benchmarks/convert_speed.py [--model DIR] [--workdir /tmp] [--shard 1GB]
                                                      [--only export,merge,branch]

Rows:
- export-hf / import-hf / export-hf --dtype bfloat16 of a random native MoE of ~2.3 GB (d_model 2048,
  8 layers, 4 experts), or of --model;
- merge: a random dense public model (d_model 1024, d_ff 4096, 6 layers, vocabulary 8192) and 6
  random expert packages of it into a 7-expert model of 2.28 GB, written as --shard shards;
- branch: the same public model into a 2-expert anchor;
- floor rows (merge_floor.py, standard library only): the merge's inputs sha256'd, copied in the
  kernel and the copies sha256'd, and the same without hashing the copies: the least any merge
  costs here that checks its inputs first and records a sha256 of every output file.
Every input is itself written streaming (random chunks), so building needs no model-sized memory.
Each step runs as its own process under a fresh wrapper, whose RUSAGE_CHILDREN ru_maxrss is that one
process's peak RSS; the disk is synced before each run and the fastest of --repeat runs is shown.
`x cp` divides by `cp` of the same output bytes; `/ largest` divides the peak RSS above the
interpreter's floor (with what the step imports: merge imports no torch) by the output's largest
tensor. All temporary files are removed at the end.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexmoe.config import ModelConfig
from flexmoe.io.keys import EXPERT_WEIGHTS, native_shapes, package_router_key, package_weight_key, storage_order
from flexmoe.io.model_dir import META, read_json, write_json
from flexmoe.io.native import open_native, write_native
from flexmoe.io.schema import PACKAGE_FORMAT
from flexmoe.io.stream import FilePool, stream_fingerprint
from flexmoe.io.writer import Generated, PartsTap, write_file
from flexmoe.train.hardware import cpu_name

BENCH_CFG = ModelConfig(vocab_size=8192, d_model=2048, num_layers=8, num_heads=16, d_ff=2048, num_experts=4, top_k=2)
PUBLIC_CFG = ModelConfig(vocab_size=8192, d_model=1024, num_layers=6, num_heads=8, d_ff=4096)
PACKAGES = 6
TORCH_FLOOR = "python + torch + flexmoe (floor)"
MERGE_FLOOR = "python + merge's imports (floor)"  # no torch
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "r = resource.getrusage(resource.RUSAGE_CHILDREN); print(r.ru_maxrss * 1024, r.ru_utime + r.ru_stime); "
           "sys.exit(rc)")


def _random(shape: tuple[int, ...], seed: int) -> Generated:
    """A random fp32 tensor produced 4M values at a time (small values, like trained weights)."""
    def make():
        gen, left = torch.Generator().manual_seed(seed), math.prod(shape)
        while left:
            n = min(left, 1 << 22)
            yield torch.rand(n, generator=gen) * 0.04 - 0.02
            left -= n
    return Generated(torch.float32, tuple(shape), make)


def build_model(dst: Path, cfg: ModelConfig = BENCH_CFG) -> Path:
    """A native merged MoE of random fp32 weights (its experts' tensor_sha256 bound as it is written)."""
    dst.mkdir(parents=True)
    tensors = {k: _random(s, i) for i, (k, s) in enumerate(sorted(native_shapes(cfg).items()))}
    meta = {"kind": "merged", "base_fingerprint": hashlib.sha256(b"bench").hexdigest(),
            "experts": [{"slot": j, "owner": f"o{j}", "domain": f"d{j}", "consent": {"allowed_uses": ["any"], "expires": None}}
                        for j in range(cfg.num_experts)]}  # consent recorded: export-hf refuses experts without
    with FilePool() as pool:
        write_native(dst, cfg, tensors, meta, pool, bind_experts=True)
    return dst


def build_public(dst: Path, cfg: ModelConfig = PUBLIC_CFG) -> tuple[Path, str]:
    """A random dense public model with its fingerprint and a public router row; returns (dir, fingerprint)."""
    dst.mkdir(parents=True)
    tensors = {k: _random(s, 100 + i) for i, (k, s) in enumerate(sorted(native_shapes(cfg).items()))}
    from safetensors.torch import save_file

    save_file({"router_embedding": torch.randn(cfg.num_layers, cfg.d_model)}, str(dst / "router_public.safetensors"))
    with FilePool() as pool:
        write_native(dst, cfg, tensors, {"kind": "public", "router_embedding": {"router_public": "router_public.safetensors"}},
                     pool, hashed=("router_public.safetensors",))
        _, lazy, _ = open_native(dst, verify=False)
        fp = stream_fingerprint(lazy, pool)
    meta = read_json(dst / META)
    write_json(dst / META, dict(meta, fingerprint=fp))  # flexmoe.json lists the files it hashes, not itself
    return dst, fp


def build_package(dst: Path, cfg: ModelConfig, fp: str, j: int) -> Path:
    """A random expert package of the public model (weights and router rows), as `flexmoe package` writes it."""
    dst.mkdir(parents=True)
    D, F = cfg.d_model, cfg.d_ff
    shapes = {package_router_key(i): (D,) for i in range(cfg.num_layers)}
    for i in range(cfg.num_layers):
        shapes.update({package_weight_key(i, n): (D, F) if n == "down_proj" else (F, D) for n in EXPERT_WEIGHTS})
    tensors = {k: _random(shapes[k], 1000 * j + n) for n, k in enumerate(storage_order(shapes, moe=True))}
    with FilePool() as pool:  # recorded by parts, one per tensor, as flex/package.py records it
        digest = write_file(dst / "expert.safetensors", tensors, pool, taps=(PartsTap(()),))
    write_json(dst / "manifest.json", {
        "format": PACKAGE_FORMAT, "owner": f"owner{j}", "domain": f"domain{j}", "licence": "bench",
        "base_fingerprint": fp, "tokens_seen": 0, "dp": None, "consent": None,
        "shape": {"num_layers": cfg.num_layers, "d_model": D, "d_ff": F}, "router_bias": False, "stage": "expert_anchor",
        "shared": [], "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {"expert.safetensors": digest}})
    return dst


def measure(argv: list[str], output: Path | None, repeat: int) -> tuple[float, int, float]:
    """(best wall seconds, peak RSS bytes, CPU seconds of the fastest run) of `repeat` runs of one
    process, each on a synced disk. CPU time (user + system) does not grow when other jobs load the
    machine, wall time does."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    best, peak, cpu = float("inf"), 0, 0.0
    for _ in range(repeat):
        if output is not None and output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.sync()  # so one step's dirty pages are not written back on the next step's clock
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{res.stderr}")
        rss, used = res.stdout.split()[-2:]
        if wall < best:
            best, cpu = wall, float(used)
        peak = max(peak, int(rss))
    return best, peak, cpu


def _weights_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.glob("*.safetensors") if p.name != "router_public.safetensors")


def _largest(d: Path) -> int:
    _, tensors, _ = open_native(d, verify=False)
    return max(t.nbytes for t in tensors.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an existing native model directory for the export rows (default: a random ~2.3 GB one)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--shard", default="1GB", help="--max-shard-size of export-hf, merge and branch")
    p.add_argument("--repeat", type=int, default=2, help="runs per step; the table shows the fastest")
    p.add_argument("--only", default="export,merge,branch", help="which groups of rows to run")
    a = p.parse_args()
    groups = set(a.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="flexmoe-bench-", dir=a.workdir))
    cli = [sys.executable, "-m", "flexmoe.cli"]
    # name: (argv, output to clear before each repeat, the cp row it is compared with)
    steps: dict[str, tuple[list[str], Path | None, str | None]] = {TORCH_FLOOR: (
        [sys.executable, "-c", "import torch, flexmoe.cli, flexmoe.convert.hf_export, flexmoe.convert.hf_import, "
                               "flexmoe.flex.merge, flexmoe.flex.branch"], None, None)}
    if "merge" in groups:  # `flexmoe merge` imports no torch (io/dtypes.py): its own floor
        steps[MERGE_FLOOR] = ([sys.executable, "-c", "import numpy, flexmoe.cli, flexmoe.commands.merge, "
                                                     "flexmoe.flex.merge"], None, None)
    built, sizes = [], {}
    try:
        t0 = time.perf_counter()
        if "export" in groups:
            model = Path(a.model) if a.model else build_model(work / "native")
            built.append(f"MoE {_weights_bytes(model) / 1e9:.2f} GB")
            cp = "cp model weights"
            steps.update({
                cp: (["cp", "-r", str(model), str(work / "copy")], work / "copy", None),
                f"export-hf (shards {a.shard})": ([*cli, "export-hf", str(model), str(work / "hf"), "--max-shard-size",
                                                   a.shard, "--quiet"], work / "hf", cp),
                "import-hf": ([*cli, "import-hf", str(work / "hf"), str(work / "back"), "--quiet"], work / "back", cp),
                "export-hf --dtype bfloat16": ([*cli, "export-hf", str(model), str(work / "hf16"), "--dtype", "bfloat16",
                                                "--max-shard-size", a.shard, "--quiet"], work / "hf16", cp)})
            sizes[cp] = (_weights_bytes(model), _largest(model))
        if groups & {"merge", "branch"}:
            public, fp = build_public(work / "public")
            built.append(f"public {_weights_bytes(public) / 1e9:.2f} GB")
        if "merge" in groups:
            pkgs = [build_package(work / f"pkg{j}", PUBLIC_CFG, fp, j) for j in range(PACKAGES)]
            built.append(f"{PACKAGES} packages {sum(_weights_bytes(x) for x in pkgs) / 1e9:.2f} GB")
            steps[f"merge {PACKAGES} packages (shards {a.shard})"] = (
                [*cli, "merge", str(public), *map(str, pkgs), "--out", str(work / "merged"), "--routing", "topk",
                 "--max-shard-size", a.shard, "--quiet"], work / "merged", "cp merged output")
            steps["cp merged output"] = (["cp", "-r", str(work / "merged"), str(work / "merged-copy")],
                                         work / "merged-copy", None)
            # What the format asks of any merge, with no torch and no per-tensor Python (merge_floor.py).
            ins = [str(public / "model.safetensors"), *(str(x / "expert.safetensors") for x in pkgs)]
            floor = [sys.executable, str(Path(__file__).with_name("merge_floor.py")), str(work / "floor")]
            steps["floor: sha256 in, copy, sha256 out"] = ([*floor, *ins], work / "floor", "cp merged output")
            steps["floor: sha256 in, copy"] = ([*floor, "--no-hash-out", *ins], work / "floor", "cp merged output")
        if "branch" in groups:
            steps[f"branch (shards {a.shard})"] = ([*cli, "branch", str(public), str(work / "anchor"), "--max-shard-size",
                                                    a.shard, "--quiet"], work / "anchor", "cp branch output")
            steps["cp branch output"] = (["cp", "-r", str(work / "anchor"), str(work / "anchor-copy")],
                                         work / "anchor-copy", None)
        build_s = time.perf_counter() - t0
        rows = {}
        for name, (argv, out, _) in steps.items():
            rows[name] = measure(argv, out, a.repeat)
            if name.startswith("merge"):
                sizes["cp merged output"] = (_weights_bytes(work / "merged"), _largest(work / "merged"))
            if name.startswith("branch"):
                sizes["cp branch output"] = (_weights_bytes(work / "anchor"), _largest(work / "anchor"))
        print(f"built {', '.join(built)} of random fp32 weights in {build_s:.0f}s", file=sys.stderr)
        cpu = cpu_name()
        print(f"\n{os.cpu_count()} cores, {cpu}; {os.uname().sysname} {os.uname().release}; best of {a.repeat}; "
              f"x cp: against cp of the same output bytes; / largest: peak RSS above the floor over the largest tensor")
        load = os.getloadavg()[0]
        print(f"{'step':<34} {'out GB':>7} {'wall s':>7} {'cpu s':>6} {'GB/s':>6} {'x cp':>6} {'peak RSS MB':>12} "
              f"{'above floor MB':>15} {'largest MB':>11} {'/ largest':>10}")
        for name, (argv, out, ref) in steps.items():
            wall, rss, cpu_s = rows[name]
            if name.endswith("(floor)"):
                print(f"{name:<34} {'':>7} {wall:>7.2f} {cpu_s:>6.1f} {'':>6} {'':>6} {rss / 1e6:>12.0f}")
                continue
            size, largest = sizes[ref or name]
            xcp = f"{wall / rows[ref][0]:.1f}" if ref else "1.0"
            floor_rss = rows[MERGE_FLOOR if name.startswith("merge") else TORCH_FLOOR][1]
            above = "" if ref is None or name.startswith("floor:") else \
                f"{(rss - floor_rss) / 1e6:>15.0f} {largest / 1e6:>11.0f} {(rss - floor_rss) / largest:>10.2f}"
            print(f"{name:<34} {size / 1e9:>7.2f} {wall:>7.2f} {cpu_s:>6.1f} {size / wall / 1e9:>6.2f} {xcp:>6} "
                  f"{rss / 1e6:>12.0f} {above}")
        print(f"load average at the end: {load:.1f} ({os.cpu_count()} cores)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
