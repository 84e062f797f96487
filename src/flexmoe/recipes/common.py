"""What the quickstart recipes share: `key=value` settings, running a step as a CLI process, the
stage line on stderr, and the public model they start from."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, TypeVar

from flexmoe.io.log import get_logger

T = TypeVar("T")
log = get_logger(__name__)


def parse_overrides(cls: type[T], argv: list[str], label: str = "quickstart") -> T:
    """Parse `key=value` overrides (the same style as `flexmoe train`) into the dataclass `cls`."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{label}: unknown setting {item!r}; known: {', '.join(fields)}")
        default = getattr(cls(), key)
        try:
            kw[key] = ([v for v in value.split(",") if v] if isinstance(default, list)
                       else type(default)(value) if not isinstance(default, bool) else value.lower() == "true")
        except ValueError as e:
            raise ValueError(f"{label}: {key}={value!r} is not a valid {type(default).__name__}") from e
    return cls(**kw)


def run_step(cmd: list[str], log: Path, threads: int) -> None:
    """Run one lifecycle step as its own process with `threads` threads, appending to `log`."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-5:]
        raise RuntimeError(f"step failed ({' '.join(cmd[:3])} ...); see {log}:\n" + "\n".join(tail))


def say(msg: str, t0: float) -> None:
    """A stage line on stderr, with the seconds since `t0`."""
    log.info(f"[quickstart {time.perf_counter() - t0:6.0f}s] {msg}", extra={"bare": True})


def train_public_model(out: Path, public_data: dict[str, Path], *, seq_len: int, batch_size: int, steps: int,
                       lr: float, seed: int, threads: int, log: Path) -> Path:
    """The public model in `out/public/final`, pretrained on public text only (reused when it
    exists), with its public router row attached; returns its directory."""
    flexmoe = [sys.executable, "-m", "flexmoe.cli"]
    public_run = out / "public"
    common = [f"data.seq_len={seq_len}", f"data.batch_size={batch_size}", "tokenizer=bytes",
              f"trainer.seed={seed}", "trainer.log_every=50"]
    if not (public_run / "final" / "flexmoe.json").exists():
        run_step(flexmoe + ["train", f"out_dir={public_run}", "stage=public_pretrain",
                        f"+data.train.public={public_data['train']}",
                        f"+data.val.public={public_data['val']}",
                        f"trainer.steps={steps}", f"optim.lr={lr}",
                        f"optim.warmup_steps={max(steps // 20, 1)}", f"trainer.threads={threads}", *common],
             log, threads)
    public = public_run / "final"
    meta = json.loads((public / "flexmoe.json").read_text())
    if not (meta.get("router_embedding") or {}).get("router_public"):
        run_step(flexmoe + ["router-embed", "--model", str(public), "--data", str(public_data["train"]),
                        "--public", "--seq-len", str(seq_len)], log, threads)
    return public
