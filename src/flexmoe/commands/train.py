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

    from flexmoe.commands.errors import debug_enabled, user_error_message
    from flexmoe.config.store import register
    from flexmoe.config.train import as_run_config

    register()
    if "--dry-run" in argv:
        argv = [a for a in argv if a != "--dry-run"] + ["dry_run=true"]
    scratch = None
    if _override(argv, "out_dir") is None:
        if _override(argv, "dry_run") == "true":  # a dry run writes nothing worth keeping
            import tempfile

            scratch = tempfile.TemporaryDirectory(prefix="flexmoe-dry-run-")
            argv = argv + [f"out_dir={scratch.name}"]
        else:
            try:
                argv = argv + [f"out_dir={default_run_dir()}"]
            except ValueError as e:
                print(f"flexmoe train: error: {e}", file=sys.stderr)
                return 2
    finished = _finished_run(argv)
    if finished:
        print(f"flexmoe train: error: {finished}", file=sys.stderr)
        return 2
    kept_row = _public_row_of(_override(argv, "out_dir"))
    result: dict = {}
    existed = _outputs_existing_before(argv)
    held = _HeldStderr(sys.stderr)

    @hydra.main(config_path=str(conf_dir()), config_name="train", version_base=None)
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        held.release()  # the config composed: from here on everything goes straight to stderr
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN:  # a sweep: each job trains in its own numbered directory
            cfg.out_dir = hc.runtime.output_dir
        try:
            # Hydra's node becomes the typed RunConfig here, once, validated: a bad setting is
            # refused before torch is even imported, and nothing below reads a Hydra node.
            run = as_run_config(cfg)
        except ValueError as e:
            if debug_enabled():
                raise
            _refuse(e, str(cfg.out_dir), existed)

        try:
            if run.dry_run:
                from flexmoe.train.dry_run import dry_run, format_dry_run

                print(OmegaConf.to_yaml(cfg))
                mcfg = load_config_of(run.init_from) if run.init_from else run.model
                from flexmoe.parallel.mesh import local_device
                from flexmoe.train.hardware import resolve_dtype

                run = resolve_dtype(run, local_device())  # the estimate counts the dtype the run would use
                info = dry_run(run, mcfg)
                print(format_dry_run(info))
                print(json.dumps(info, indent=1))
                result.update(info)
                return
            from flexmoe.train.trainer import train

            out = train(run)
        except Exception as e:  # noqa: BLE001  a user's mistake: one line, not a traceback; a bug: re-raised
            if user_error_message(e) is None or debug_enabled():
                raise
            _refuse(e, run.out_dir, existed)
        result.update(out)
        if int(os.environ.get("RANK", "0")) != 0:  # one summary per run, not per rank
            return
        print(json.dumps({k: v for k, v in out.items() if k in (
            "final", "val_loss", "tokens_seen", "params_total", "params_active", "params_trainable",
            "flops_per_token", "memory_estimate_gib")}, indent=1))

    sys.argv = ["flexmoe train"] + argv
    sys.stderr = held  # Hydra's own refusal of an override is collected until the job starts
    try:
        _main()
    except SystemExit as e:
        if e.code == 1 and held.held:  # Hydra refused the overrides or the config (its exit code 1)
            sys.stderr = held.real
            return _report_hydra_error(held.take(), argv)
        raise
    finally:
        sys.stderr = held.real
        held.release()
        if scratch is not None:
            scratch.cleanup()
    if kept_row is not None and result.get("final") and int(os.environ.get("RANK", "0")) == 0:
        _reattach_public_row(Path(result["final"]), kept_row)
    return 0


class _HeldStderr:
    """stderr that holds what is written until `release()` (then passes everything through)."""

    def __init__(self, real) -> None:
        self.real, self.parts, self.held = real, [], True

    def write(self, text: str) -> int:
        if self.held:
            self.parts.append(text)
            return len(text)
        return self.real.write(text)

    def flush(self) -> None:
        self.real.flush()

    def take(self) -> str:
        text, self.parts, self.held = "".join(self.parts), [], False
        return text

    def release(self) -> None:
        if self.held:
            text = self.take()
            if text:
                self.real.write(text)

    def __getattr__(self, name: str):
        if name == "real":  # not yet set (an object being unpickled): never recurse
            raise AttributeError(name)
        return getattr(self.real, name)

    # A sweep launcher (submitit) pickles the job function and with it this object: the copy
    # in the job writes straight to that process's own stderr.
    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.real, self.parts, self.held = sys.__stderr__, [], False


def _unparsable_override(argv: list[str]) -> str | None:
    """The first command-line override Hydra's grammar rejects (its message does not name it)."""
    try:
        from hydra.core.override_parser.overrides_parser import OverridesParser

        parser = OverridesParser.create()
    except Exception:  # noqa: BLE001  (only a nicer message is lost)
        return None
    for a in argv:
        if a.startswith("-"):
            continue
        try:
            parser.parse_overrides([a])
        except Exception:  # noqa: BLE001  (Hydra's OverrideParseException and the like)
            return a
    return None


def _report_hydra_error(text: str, argv: list[str]) -> int:
    """Hydra's message about a bad override, unknown key or missing config group, without its
    HYDRA_FULL_ERROR hint, then one line that names the setting; exit code 2 like every user error."""
    import re

    from flexmoe.commands.errors import EXIT_USER_ERROR

    if "Traceback (most recent call last)" in text:  # not a refused override: a bug, shown as Hydra printed it
        sys.stderr.write(text)
        return 1
    lines = [ln.rstrip() for ln in text.splitlines() if "HYDRA_FULL_ERROR" not in ln]
    while lines and not lines[-1]:
        lines.pop()
    if lines:
        sys.stderr.write("\n".join(lines) + "\n")
    skip = ("Available options", "Config search path", "See https://", "provider=", "To append to your config")
    said = [ln.strip().rstrip(".") for ln in lines
            if ln.strip() and not ln.startswith((" ", "\t")) and not ln.startswith(skip)]
    key = re.search(r"full_key: (\S+)", text)
    summary = "; ".join(said[:2]) or "Hydra refused the command line"
    if key and key.group(1) not in summary:
        summary += f" ({key.group(1)})"
    bad = _unparsable_override(argv)
    if bad is not None and bad not in summary:
        summary += f" (in the override {bad!r})"
    print(f"flexmoe train: error: {summary}; fix or drop that override (`flexmoe train --help` lists the settings)",
          file=sys.stderr)
    return EXIT_USER_ERROR


def _override(argv: list[str], key: str) -> str | None:
    """The value of `key=...` (or `+key=...`) on the command line, the last one winning."""
    found = None
    for a in argv:
        if a.lstrip("+").startswith(key + "="):
            found = a.split("=", 1)[1]
    return found


def default_run_dir() -> str:
    """A fresh run directory for a run that names none: `$FLEXMOE_RUN_DIR`, `runs/slurm-<job id>`
    inside SLURM (a requeued job resumes there), `runs/torchrun-<run id>` under torchrun (every rank
    must agree, and torchrun gives them one id), else `runs/<date>/<time>` (Hydra's style)."""
    import time

    env = os.environ
    if env.get("FLEXMOE_RUN_DIR"):
        return env["FLEXMOE_RUN_DIR"]
    if env.get("SLURM_JOB_ID"):
        task = env.get("SLURM_ARRAY_TASK_ID")
        return f"runs/slurm-{env['SLURM_JOB_ID']}" + (f"_{task}" if task else "")
    if int(env.get("WORLD_SIZE", "1")) > 1:
        rid = env.get("TORCHELASTIC_RUN_ID")
        if rid and rid != "none":
            return f"runs/torchrun-{rid}"
        raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']}: the ranks need one shared run directory and have no "
                         "common run id; pass out_dir=DIR (launch/run.py and slurm/*.sbatch do)")
    base = Path("runs") / time.strftime("%Y-%m-%d") / time.strftime("%H-%M-%S")
    path, n = base, 1
    while path.exists():  # two runs started in the same second
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return str(path)


def _finished_run(argv: list[str]) -> str | None:
    """The refusal for training into a finished run's directory, checked before Hydra writes its
    record of this run into it; None when the run may go on."""
    out = _override(argv, "out_dir")
    if not out or "${" in out or (_override(argv, "trainer.overwrite_final") or "").lower() == "true":
        return None
    final = Path(out) / "final"
    if (final / "flexmoe.json").is_file():
        return (f"out_dir={out}: holds a finished run ({final}); choose a new out_dir, or "
                "trainer.overwrite_final=true to train it again and replace final/")
    return None


def _public_row_of(out_dir: str | None) -> bytes | None:
    """The public router row `router-embed --public` attached to `out_dir/final`, if any (kept so
    that trainer.overwrite_final=true does not drop it)."""
    if not out_dir:
        return None
    final = Path(out_dir) / "final"
    try:
        meta = json.loads((final / "flexmoe.json").read_text())
        name = (meta.get("router_embedding") or {}).get("router_public")
        return (final / name).read_bytes() if name else None
    except (OSError, ValueError):
        return None


def _reattach_public_row(final: Path, row: bytes) -> None:
    from flexmoe.flex.router_init import attach_public_embedding
    from flexmoe.io.files import atomic_write_bytes, scratch_dir

    with scratch_dir(final) as tmp:
        atomic_write_bytes(tmp / "router_public.safetensors", row)
        attach_public_embedding(final, tmp / "router_public.safetensors")


def _outputs_existing_before(argv: list[str]) -> dict[str, bool]:
    """resolved out_dir -> whether it existed before this run (for the ones the command line or the
    default names), so a refused run removes only a directory it created itself."""
    from flexmoe.config.train import RunConfig

    paths = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith("out_dir=")] + [RunConfig.out_dir]
    return {str(Path(p).resolve()): Path(p).exists() for p in paths if p}


def _refuse(e: BaseException, out_dir: str, existed: dict[str, bool]) -> None:
    """One line for a user's mistake, exit 2, and nothing left behind: Hydra's record of the
    refused run (.hydra/, train.log) goes, with the output directory if this run created it."""
    import shutil

    from flexmoe.commands.errors import EXIT_USER_ERROR, user_error_message

    out = Path(out_dir)
    if out.is_dir() and {p.name for p in out.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(out / ".hydra", ignore_errors=True)
        (out / "train.log").unlink(missing_ok=True)
        if existed.get(str(out.resolve())) is False and not any(out.iterdir()):
            out.rmdir()
    print(f"flexmoe train: error: {user_error_message(e) or e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


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
