#!/usr/bin/env python3
"""Run `flexmoe train` on N processes with torchrun: one output directory per run.

    python launch/run.py --nproc 4 -- out_dir=runs/x parallel=tp_ep data.train.code=DIR ...
    python launch/run.py --nproc 8 --nnodes 2 --node-rank 0 --master-addr HOST -- ...   # multi-node

Everything after `--` goes to `flexmoe train` (Hydra overrides). All ranks share `out_dir`:
rank 0 writes metrics.jsonl, checkpoints' markers and final/; every rank writes its checkpoint
shards there. Each rank's full console output is kept in `out_dir/logs/<launch time>/` (torchrun
--tee); the console shows rank 0 only unless --all-ranks, each line prefixed `[rankN]:`.
Without --threads, each rank gets cores // nproc torch threads, so ranks do not oversubscribe.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _override(overrides: list[str], key: str) -> str | None:
    for o in overrides:
        if o.lstrip("+").startswith(key + "="):
            return o.split("=", 1)[1]
    return None


def build_command(a: argparse.Namespace, overrides: list[str]) -> tuple[list[str], dict[str, str], Path]:
    if _override(overrides, "out_dir") is None:
        # one run directory for every rank, named once here (each rank naming its own would split the run)
        overrides = overrides + [f"out_dir={time.strftime('runs/%Y-%m-%d/%H-%M-%S')}"]
    out_dir = Path(_override(overrides, "out_dir"))
    log_dir = out_dir / "logs" / time.strftime("%Y%m%d-%H%M%S")
    threads = a.threads or max(1, (os.cpu_count() or 1) // a.nproc)
    if _override(overrides, "trainer.threads") is None:
        overrides = overrides + [f"trainer.threads={threads}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}", f"--log-dir={log_dir}",
           "--tee=3"]
    if not a.all_ranks:
        cmd.append("--local-ranks-filter=0")
    if a.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={a.nnodes}", f"--node-rank={a.node_rank}",
                f"--master-addr={a.master_addr}", f"--master-port={a.master_port}"]
    cmd += ["-m", "flexmoe.cli", "train", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # Run from a checkout without installing: the package lives in src/.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH")) if p)
    return cmd, env, out_dir


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, overrides = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(prog="launch/run.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes on this node (default 2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores // nproc)")
    p.add_argument("--all-ranks", action="store_true", help="show every rank's console output")
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--master-addr", default="127.0.0.1")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--print", action="store_true", help="print the torchrun command and exit")
    a, rest = p.parse_known_args(ours)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        p.error(f"unknown options {bad}; flexmoe train's overrides are key=value (after `--`)")
    overrides = rest + overrides  # `--` is optional when every override is key=value
    if a.nproc < 1:
        p.error(f"--nproc={a.nproc} must be >= 1")
    cmd, env, out_dir = build_command(a, overrides)
    if a.print:
        print(" ".join(cmd))
        return 0
    print(f"[launch] {a.nproc} x {a.nnodes} processes -> {out_dir}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env)
    # Pass Ctrl-C / a scheduler's SIGTERM on to torchrun, which stops its workers cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
