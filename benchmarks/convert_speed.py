"""export-hf / import-hf against `cp` of the same bytes: wall time and peak resident memory.

    PYTHONPATH=src python benchmarks/convert_speed.py [--model DIR] [--workdir /tmp] [--shard 1GB]

Without --model it writes a random native MoE of ~2.3 GB (d_model 2048, 8 layers, 4 experts),
itself streamed, so building it needs no model-sized memory. Each step runs as its own process
under a fresh wrapper, whose RUSAGE_CHILDREN ru_maxrss is that one process's peak RSS; the disk
is synced before each run and the fastest of --repeat runs is shown. All temporary files are
removed at the end. Prints one table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from flexmoe.config import ModelConfig
from flexmoe.io.keys import native_shapes
from flexmoe.io.model_dir import CONFIG, META, WEIGHTS
from flexmoe.io.files import sha256_file
from flexmoe.io.stream import LazyTensor, Span, write_all, write_file

BENCH_CFG = ModelConfig(vocab_size=8192, d_model=2048, num_layers=8, num_heads=16, d_ff=2048, num_experts=4, top_k=2)
WRAPPER = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(rc)")


class RandomSource:
    """Stands in for `stream.FilePool` in `write_file`: random fp32 chunks instead of file bytes."""

    def __init__(self, chunk: int = 1 << 24, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)
        self.chunk = chunk

    def copy_into(self, t: LazyTensor, out):
        left = t.nbytes
        while left:
            n = min(self.chunk, left)
            write_all(out, (torch.rand(n // 4, generator=self.gen) * 0.04 - 0.02).view(torch.uint8).numpy())
            left -= n
            yield n


def build_model(dst: Path, cfg: ModelConfig = BENCH_CFG) -> Path:
    """A native model directory of random fp32 weights, written chunk by chunk."""
    dst.mkdir(parents=True)
    tensors = {k: LazyTensor(torch.float32, s, (Span(Path("<random>"), 0, 4 * int(torch.Size(s).numel())),))
               for k, s in sorted(native_shapes(cfg).items())}
    sha = write_file(dst / WEIGHTS, tensors, RandomSource(), metadata={"format": "pt"})  # type: ignore[arg-type]
    cfg.save(dst / CONFIG)
    (dst / META).write_text(json.dumps({"kind": "merged", "base_fingerprint": hashlib.sha256(b"bench").hexdigest(),
                                        "experts": [{"slot": j, "owner": f"o{j}", "domain": f"d{j}"}
                                                    for j in range(cfg.num_experts)],
                                        "files": {WEIGHTS: sha, CONFIG: sha256_file(dst / CONFIG)}}))
    return dst


def measure(argv: list[str], output: Path | None, repeat: int) -> tuple[float, int]:
    """(best wall seconds, peak RSS bytes) of `repeat` runs of one process, each on a synced disk."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    best, peak = float("inf"), 0
    for _ in range(repeat):
        if output is not None and output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.sync()  # so one step's dirty pages are not written back on the next step's clock
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-c", WRAPPER, *argv], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - t0
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed:\n{res.stderr}")
        best, peak = min(best, wall), max(peak, int(res.stdout.split()[-1]))
    return best, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an existing native model directory (default: build a random ~2.3 GB one)")
    p.add_argument("--workdir", default=tempfile.gettempdir())
    p.add_argument("--shard", default="1GB", help="export-hf --max-shard-size")
    p.add_argument("--repeat", type=int, default=2, help="runs per step; the table shows the fastest")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flexmoe-bench-", dir=a.workdir))
    try:
        t0 = time.perf_counter()
        model = Path(a.model) if a.model else build_model(work / "native")
        build_s = time.perf_counter() - t0
        size = (model / WEIGHTS).stat().st_size
        cli = [sys.executable, "-m", "flexmoe.cli"]
        steps = {  # name: (argv, output to clear before each repeat)
            "python + torch + flexmoe (floor)": (
                [sys.executable, "-c", "import torch, flexmoe.cli, flexmoe.convert.hf_export, flexmoe.convert.hf_import"], None),
            "cp model.safetensors": (["cp", str(model / WEIGHTS), str(work / "copy.safetensors")], work / "copy.safetensors"),
            f"export-hf (shards {a.shard})": (
                [*cli, "export-hf", str(model), str(work / "hf"), "--max-shard-size", a.shard], work / "hf"),
            "import-hf": ([*cli, "import-hf", str(work / "hf"), str(work / "back")], work / "back"),
            "export-hf --dtype bfloat16": (
                [*cli, "export-hf", str(model), str(work / "hf16"), "--dtype", "bfloat16", "--max-shard-size", a.shard],
                work / "hf16"),
        }
        rows = {name: measure(argv, out, a.repeat) for name, (argv, out) in steps.items()}
        if not a.model:
            print(f"built a {size / 1e9:.2f} GB model in {build_s:.1f}s", file=sys.stderr)
        floor_rss, cp_s = rows["python + torch + flexmoe (floor)"][1], rows["cp model.safetensors"][0]
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        print(f"\nmodel {size / 1e9:.2f} GB fp32 ({model}); {os.cpu_count()} cores, {cpu}; page cache warm; "
              f"best of {a.repeat}")
        print(f"{'step':<34} {'wall s':>7} {'GB/s':>6} {'x cp':>6} {'peak RSS MB':>12} {'above floor MB':>15} {'% of model':>11}")
        for name, (wall, rss) in rows.items():
            floor = name.endswith("(floor)") or name.startswith("cp")
            extra = "" if floor else f"{(rss - floor_rss) / 1e6:>15.0f} {100 * (rss - floor_rss) / size:>10.1f}%"
            print(f"{name:<34} {wall:>7.2f} {'' if name.endswith('(floor)') else f'{size / wall / 1e9:.2f}':>6} "
                  f"{'' if name.endswith('(floor)') else f'{wall / cp_s:.1f}':>6} {rss / 1e6:>12.0f} {extra}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
