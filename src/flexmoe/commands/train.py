"""`flexmoe train`: a Hydra app over RunConfig; `--dry-run` prints sizes and exits."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe train`: a Hydra app over RunConfig; `--dry-run` prints sizes and exits."""
    import hydra
    from omegaconf import OmegaConf

    from flexmoe.config.store import register
    from flexmoe.config.train import as_run_config

    register()
    if "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"] + ["dry_run=true"]
    result: dict = {}

    @hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # a sweep: each job trains in its own numbered directory
            cfg.out_dir = hc.runtime.output_dir
        try:
            # Hydra's node becomes the typed RunConfig here, once, validated: a bad setting is
            # refused before torch is even imported, and nothing below reads a Hydra node.
            run = as_run_config(cfg)
        except ValueError as e:
            print(f"flexmoe train: error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)

        try:
            if run.dry_run:
                from flexmoe.train.dry_run import dry_run, format_dry_run

                print(OmegaConf.to_yaml(cfg))
                mcfg = load_config_of(run.init_from) if run.init_from else run.model
                info = dry_run(run, mcfg)
                print(format_dry_run(info))
                print(json.dumps(info, indent=1))
                result.update(info)
                return
            from flexmoe.train.trainer import train

            out = train(run)
        except (ValueError, FileNotFoundError) as e:  # a user's mistake: one line, not a traceback
            if os.environ.get("FLEXMOE_DEBUG"):
                raise
            print(f"flexmoe train: error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        result.update(out)
        if int(os.environ.get("RANK", "0")) != 0:  # one summary per run, not per rank
            return
        print(json.dumps({k: v for k, v in out.items() if k in (
            "final", "val_loss", "tokens_seen", "params_total", "params_active", "params_trainable",
            "flops_per_token", "memory_estimate_gib")}, indent=1))

    sys.argv = ["flexmoe train"] + argv
    _main()
    return 0


def load_config_of(model_dir: str):
    from flexmoe.config.model import ModelConfig

    return ModelConfig.load(Path(model_dir) / "config.json")


def conf_dir() -> Path:
    """The Hydra config tree: $FLEXMOE_CONF, else the one shipped inside the package (flexmoe/conf,
    also reachable as the repository's top-level conf/), so a wheel install trains from any directory."""
    env = os.environ.get("FLEXMOE_CONF")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[1] / "conf"
