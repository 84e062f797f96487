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

    register()
    if "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"] + ["dry_run=true"]
    result: dict = {}

    @hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        problem = _early_check(cfg)
        if problem:  # refuse a bad layout before torch is even imported
            print(f"flexmoe train: error: {problem}", file=sys.stderr)
            sys.exit(2)
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # a sweep: each job trains in its own numbered directory
            cfg.out_dir = hc.runtime.output_dir

        try:
            if cfg.dry_run:
                from flexmoe.config.model import ModelConfig
                from flexmoe.train.dry_run import dry_run, format_dry_run

                print(OmegaConf.to_yaml(cfg))
                mcfg = (load_config_of(cfg.init_from) if cfg.init_from else
                        ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)))
                info = dry_run(cfg, mcfg)
                print(format_dry_run(info))
                print(json.dumps(info, indent=1))
                result.update(info)
                return
            from flexmoe.train.trainer import train

            out = train(cfg)
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


def _early_check(cfg) -> str | None:
    """Settings that can be refused from the config alone, in milliseconds."""
    from flexmoe.config.train import DATA_FORMATS, FREEZE_PLAN_NAMES

    if cfg.stage.freeze not in FREEZE_PLAN_NAMES:
        return f"stage.freeze={cfg.stage.freeze!r} is not one of {', '.join(FREEZE_PLAN_NAMES)}"
    fmt = cfg.data.get("format", "lm")
    if fmt not in DATA_FORMATS:
        return f"data.format={fmt!r} is not one of {', '.join(DATA_FORMATS)}"
    par, m = cfg.get("parallel"), cfg.model
    if par is None or cfg.init_from:
        return None
    heads, kv = m.num_heads, m.num_kv_heads or m.num_heads
    if par.tp > 1 and (heads % par.tp or kv % par.tp):
        return f"parallel.tp={par.tp} does not divide model.num_heads={heads} and model.num_kv_heads={kv}"
    if par.ep > 1 and m.num_experts % par.ep:
        return f"parallel.ep={par.ep} does not divide model.num_experts={m.num_experts}"
    return None


def load_config_of(model_dir: str):
    from flexmoe.config.model import ModelConfig

    return ModelConfig.load(Path(model_dir) / "config.json")


def conf_dir() -> Path:
    """The Hydra config tree: $FLEXMOE_CONF, else the repository's conf/ beside src/."""
    env = os.environ.get("FLEXMOE_CONF")
    if env:
        return Path(env).resolve()
    return Path(__file__).resolve().parents[3] / "conf"
