"""`flexmoe branch`: dense public model -> the owner's 2-expert anchor model."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe branch`: dense public model -> the owner's 2-expert anchor model."""
    from safetensors.torch import load_file

    from flexmoe.flex.branch import branch

    p = argparse.ArgumentParser(prog="flexmoe branch", description=main.__doc__)
    p.add_argument("public")
    p.add_argument("out")
    p.add_argument("--router-embedding", help="the owner's rows from `flexmoe router-embed`")
    p.add_argument("--router-bias", action="store_true", help="add FlexOlmo's non-positive per-expert bias")
    a = p.parse_args(argv)
    given = load_file(a.router_embedding) if a.router_embedding else {}
    print(branch(a.public, a.out, given.get("router_embedding"), router_bias=a.router_bias,
                 owner_ngram=given.get("domain_ngram")))
    return 0
