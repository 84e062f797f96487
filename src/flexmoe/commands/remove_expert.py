"""`flexmoe remove-expert`: a release of a merged model without one owner's expert."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe remove-expert`: a release of a merged model without one owner's expert."""
    from flexmoe.commands.common import (add_verify_argument, add_writer_arguments, inputs_hashed_aside, verify_inputs,
                                         writer_options)

    p = argparse.ArgumentParser(prog="flexmoe remove-expert", description=main.__doc__)
    p.add_argument("src", help="native merged model directory")
    p.add_argument("dst", help="output directory (must not exist or be empty)")
    p.add_argument("--expert", required=True, metavar="NAME", help="owner or domain of the expert to drop")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    add_verify_argument(p)
    add_writer_arguments(p)
    a = p.parse_args(argv)
    opts = writer_options(a)
    verify = verify_inputs(a, "remove-expert", a.src)
    with inputs_hashed_aside([a.src] if verify else []):  # children hash the source while torch is imported
        from flexmoe.flex.release import remove_expert

        print(remove_expert(a.src, a.dst, a.expert, overwrite=a.overwrite, verify=verify, **opts))
    return 0
