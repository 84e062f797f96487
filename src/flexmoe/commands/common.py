"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path


def name_eq_value(item: str, flag: str, parser: argparse.ArgumentParser) -> tuple[str, str]:
    """`NAME=VALUE` of a repeated flag, or a usage error naming the flag."""
    if "=" not in item:
        parser.error(f"{flag} {item!r}: expected NAME=PATH")
    name, value = item.split("=", 1)
    return name, value


def add_consent_arguments(p: argparse.ArgumentParser) -> None:
    """`--allowed-uses` and `--expires` for `flexmoe package` (pass them to make_package)."""
    from flexmoe.flex.consent import USES

    p.add_argument("--allowed-uses", type=lambda s: [u for u in s.split(",") if u], default=None,
                   help=f"comma-separated uses the owner consents to ({', '.join(USES)}); none: no use= request "
                        "activates this expert")
    p.add_argument("--expires", help="last day of consent, YYYY-MM-DD (default: no expiry)")


def add_verify_argument(p: argparse.ArgumentParser) -> None:
    """`--no-verify`: skip the sha256 and per-expert tensor hash checks of the inputs (the one switch
    for users who verified them already); read the result with `verify_inputs`."""
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the inputs' sha256 and per-expert tensor_sha256 checks (you verified them already); "
                        "schemas, shapes and values are checked either way")


def verify_inputs(a: argparse.Namespace, command: str, *inputs: str) -> bool:
    """The parsed `--no-verify` as a bool; when checks are skipped, says so on stderr, naming the inputs."""
    if not a.verify:
        from flexmoe.io.log import get_logger

        get_logger(__name__).warning(f"{command} --no-verify: sha256 and tensor_sha256 checks skipped for "
                                     f"{', '.join(map(str, inputs))}")
    return a.verify


def add_writer_arguments(p: argparse.ArgumentParser, shards: bool = True) -> None:
    """`--max-shard-size` (native model outputs: one model.safetensors unless given) and `--quiet`
    (no progress bar or lines); read them with `writer_options`."""
    if shards:
        p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                       help="write the weights as shards of at most SIZE (e.g. 5GB, 500MB, 2GiB) with "
                            "model.safetensors.index.json, as Hugging Face does (default: one model.safetensors)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines on stderr")


def writer_options(a: argparse.Namespace) -> dict:
    """Apply `--quiet` (progress and info lines off) and return {"max_shard_size": ...} when the
    command takes it (a malformed size is refused here, before any input is read)."""
    if getattr(a, "quiet", False):
        import logging

        from flexmoe.io.log import get_logger
        from flexmoe.io.progress import set_quiet

        set_quiet(True)
        get_logger("flexmoe").setLevel(logging.WARNING)  # after its setup, which would reset the level
    if not hasattr(a, "max_shard_size"):
        return {}
    from flexmoe.config.sizes import parse_size  # not io.native: merge starts work before torch is imported

    parse_size(a.max_shard_size)
    return {"max_shard_size": a.max_shard_size}


def add_selection_arguments(p: argparse.ArgumentParser) -> None:
    """`--opt-out`, `--use` and `--date`: which experts of a merged model take part."""
    p.add_argument("--opt-out", default="", help="comma-separated owners or domains to switch off")
    p.add_argument("--use", help="activate only experts whose consent covers this use (research, commercial, ...)")
    p.add_argument("--date", help="the date consent is checked for (default: today, UTC)")


def load_selected(model_dir: str, a: argparse.Namespace, verify: bool = True):
    """(model, cfg, meta, expert mask) for the experts the parsed selection arguments allow."""
    from flexmoe.flex.consent import load_for_use

    return load_for_use(model_dir, use=a.use, opt_out=[o for o in a.opt_out.split(",") if o], today=a.date,
                        verify=verify)


def model_tokenizer(model_dir: str, meta: dict, override: str | None):
    """The tokenizer recorded in a model's flexmoe.json (or the override)."""
    from flexmoe.data import load_tokenizer

    spec = override or meta.get("tokenizer")
    if spec is None:
        raise ValueError(f"{Path(model_dir) / 'flexmoe.json'}: records no tokenizer; pass --tokenizer bytes|DIR")
    if isinstance(spec, dict) and spec.get("type") == "hf" and not Path(spec["path"]).is_absolute():
        spec = dict(spec, path=str(Path(model_dir) / spec["path"]))  # import-hf records it relative to the model
    return load_tokenizer(spec)


@contextlib.contextmanager
def inputs_hashed_aside(models=(), packages=(), fingerprint_of: str | None = None):
    """While the block runs, child processes hash the weight files that these native model directories
    (flexmoe.json) and packages (manifest.json) list, and with `fingerprint_of` that dense model's
    fingerprint (io.prehash); the readers take the children's digests instead of hashing in their own
    pass. Enter it before importing torch: the children hash while this process imports it."""
    from flexmoe.io import prehash

    records = {f: r for m in models for f, r in prehash.listed_records(m, "flexmoe.json", model=True).items()}
    records.update({f: r for pkg in packages for f, r in prehash.listed_records(pkg, "manifest.json").items()})
    fp = prehash.listed_weight_files(fingerprint_of, "flexmoe.json", model=True) if fingerprint_of else []
    pkg_files = [f for pkg in packages for f in prehash.listed_weight_files(pkg, "manifest.json")]
    prehash.start(list(records), fingerprint=fp, parts=prehash.parts_of(records), finite=pkg_files)
    try:
        yield
    finally:
        prehash.stop()
