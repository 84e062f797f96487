"""`flexmoe import-hf`: Hugging Face Olmo2 / FlexOlmo directory (safetensors) -> native model directory."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe import-hf`: Hugging Face Olmo2 / FlexOlmo directory (safetensors) -> native model directory."""
    from flexmoe.commands.common import add_writer_arguments, writer_options
    from flexmoe.convert.hf_import import import_hf

    p = argparse.ArgumentParser(prog="flexmoe import-hf", description=main.__doc__)
    p.add_argument("src", help="HF directory: config.json + model.safetensors or sharded with an index")
    p.add_argument("dst", help="output native model directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    add_writer_arguments(p)
    a = p.parse_args(argv)
    print(import_hf(a.src, a.dst, overwrite=a.overwrite, **writer_options(a)))
    return 0
