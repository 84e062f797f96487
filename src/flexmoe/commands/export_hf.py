"""`flexmoe export-hf`: native model directory (public, anchor or merged) -> Hugging Face directory."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe export-hf`: native model directory (public, anchor or merged) -> Hugging Face directory."""
    from flexmoe.commands.common import add_verify_argument, add_writer_arguments, verify_inputs, writer_options
    from flexmoe.convert.hf_export import EXPORT_DTYPES, export_hf

    p = argparse.ArgumentParser(prog="flexmoe export-hf", description=main.__doc__)
    p.add_argument("src", help="native model directory (e.g. the output of `flexmoe merge`)")
    p.add_argument("dst", help="output HF directory (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    add_verify_argument(p)
    add_writer_arguments(p, shards=False)
    a = p.parse_args(argv)
    writer_options(a)
    verify = verify_inputs(a, "export-hf", a.src)
    print(export_hf(a.src, a.dst, max_shard_size=a.max_shard_size, dtype=a.dtype, overwrite=a.overwrite,
                    verify=verify))
    return 0
