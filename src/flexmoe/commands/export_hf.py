"""`flexmoe export-hf`: native model directory (public, anchor or merged) -> Hugging Face directory."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe export-hf`: native model directory (public, anchor or merged) -> Hugging Face directory."""
    from flexmoe.commands.common import add_verify_argument, add_writer_arguments, verify_inputs, writer_options
    from flexmoe.convert.hf_export import EXPORT_DTYPES, export_hf
    from flexmoe.flex.release import release_for_use
    from flexmoe.io.files import check_output_dir, scratch_dir
    from flexmoe.io.log import get_logger
    from flexmoe.io.model_dir import refuse_overlap

    log = get_logger(__name__)

    p = argparse.ArgumentParser(prog="flexmoe export-hf", description=main.__doc__)
    p.add_argument("src", help="native model directory (e.g. the output of `flexmoe merge`)")
    p.add_argument("dst", help="output HF directory (must not exist or be empty)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="cast floating tensors (default: as stored)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    p.add_argument("--use", help="the use this release is for: experts whose consent does not cover it are "
                                 "removed first (as remove-expert does), and the model card says so")
    p.add_argument("--date", help="the date consent is checked for (default: today, UTC)")
    p.add_argument("--allow-unrecorded-consent", action="store_true",
                   help="ship experts that carry no consent record (refused by default)")
    add_verify_argument(p)
    add_writer_arguments(p, shards=False)
    a = p.parse_args(argv)
    writer_options(a)
    verify = verify_inputs(a, "export-hf", a.src)
    refuse_overlap(a.dst, [a.src], "DST")
    check_output_dir(a.dst, a.overwrite, "--overwrite")  # before any expert is removed, not after
    with scratch_dir(Path(a.dst)) as scratch:
        src, dropped = release_for_use(a.src, scratch, use=a.use, allow_unrecorded=a.allow_unrecorded_consent,
                                       today=a.date, verify=verify)
        if dropped:
            log.info(f"export-hf --use {a.use}: removed {', '.join(dropped)} (consent does not cover {a.use})")
        print(export_hf(src, a.dst, max_shard_size=a.max_shard_size, dtype=a.dtype, overwrite=a.overwrite,
                        verify=verify and src == Path(a.src), use=a.use))
    return 0
