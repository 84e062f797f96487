"""CLI subcommands for Hugging Face interop and release tools (wired into `flexmoe` by cli.py).

    flexmoe import-hf SRC DST
    flexmoe export-hf SRC DST [--max-shard-size 5GB] [--dtype float32|bfloat16|float16]
    flexmoe remove-expert SRC DST --expert NAME
"""

from __future__ import annotations

import argparse


def cmd_import_hf(argv: list[str]) -> int:
    """`flexmoe import-hf`: Hugging Face Olmo2 / FlexOlmo directory (safetensors) -> native model directory."""
    from flexmoe.convert.hf_import import import_hf

    p = argparse.ArgumentParser(prog="flexmoe import-hf", description=cmd_import_hf.__doc__)
    p.add_argument("src", help="HF directory: config.json + model.safetensors or sharded with an index")
    p.add_argument("dst", help="output native model directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    a = p.parse_args(argv)
    print(import_hf(a.src, a.dst, overwrite=a.overwrite))
    return 0


def cmd_export_hf(argv: list[str]) -> int:
    """`flexmoe export-hf`: native model directory (public, anchor or merged) -> Hugging Face directory."""
    from flexmoe.convert.hf_export import EXPORT_DTYPES, export_hf

    p = argparse.ArgumentParser(prog="flexmoe export-hf", description=cmd_export_hf.__doc__)
    p.add_argument("src", help="native model directory (e.g. the output of `flexmoe merge`)")
    p.add_argument("dst", help="output HF directory (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    a = p.parse_args(argv)
    print(export_hf(a.src, a.dst, max_shard_size=a.max_shard_size, dtype=a.dtype, overwrite=a.overwrite))
    return 0


def cmd_remove_expert(argv: list[str]) -> int:
    """`flexmoe remove-expert`: a release of a merged model without one owner's expert."""
    from flexmoe.flex.release import remove_expert

    p = argparse.ArgumentParser(prog="flexmoe remove-expert", description=cmd_remove_expert.__doc__)
    p.add_argument("src", help="native merged model directory")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--expert", required=True, metavar="NAME", help="owner or domain of the expert to drop")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    a = p.parse_args(argv)
    print(remove_expert(a.src, a.dst, a.expert, overwrite=a.overwrite))
    return 0


COMMANDS: dict = {"import-hf": cmd_import_hf, "export-hf": cmd_export_hf, "remove-expert": cmd_remove_expert}
