"""`flexmoe checkpoint-to-model`: a training checkpoint (RUN/checkpoints/step-N) -> a native model directory."""

from __future__ import annotations

import argparse
import json


def main(argv: list[str]) -> int:
    """`flexmoe checkpoint-to-model`: a training checkpoint (RUN/checkpoints/step-N) -> a native model
    directory that eval, generate, package and export-hf read (frozen tensors rebuilt from the run's
    init_from, whose files must be unchanged, or its seed)."""
    from flexmoe.train.to_model import checkpoint_to_model

    p = argparse.ArgumentParser(prog="flexmoe checkpoint-to-model", description=main.__doc__)
    p.add_argument("checkpoint", help="a complete checkpoint directory, e.g. runs/x/checkpoints/step-00000100")
    p.add_argument("out", help="output model directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    a = p.parse_args(argv)
    result = checkpoint_to_model(a.checkpoint, a.out, overwrite=a.overwrite)
    print(json.dumps({k: result[k] for k in ("final", "step", "checkpoint", "tokens_seen") if k in result}, indent=1))
    return 0
