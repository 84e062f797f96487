"""`flexmoe merge`: public model + expert packages -> one (N+1)-expert model."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe merge`: public model + expert packages -> one (N+1)-expert model."""
    from flexmoe.config.model import ROUTINGS
    from flexmoe.commands.common import add_verify_argument, add_writer_arguments, verify_inputs, writer_options
    from flexmoe.flex.merge import merge

    p = argparse.ArgumentParser(prog="flexmoe merge", description=main.__doc__)
    p.add_argument("public")
    p.add_argument("packages", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int)
    p.add_argument("--norm-topk-prob", action="store_true")
    p.add_argument("--routing", default="auto", choices=["auto", *ROUTINGS],
                   help="routing policy of the merged model (see model.routing); auto: anchor_ngram when every "
                        "package carries an n-gram profile, else topk (the only policy export-hf can write)")
    p.add_argument("--shared", default="public", choices=["public", "average"],
                   help="shared tensors: the public copy (FlexOlmo) or the mean of the packages' copies (BAR)")
    p.add_argument("--router-rows", default="raw", choices=["raw", "common_norm", "centred_norm"],
                   help="rescale router rows at merge time (see flex/merge.py ROW_TRANSFORMS)")
    p.add_argument("--router-cosine-temp", type=float, default=0.0, metavar="T",
                   help="route by cosine similarity of hidden state and row over temperature T (0: dot product)")
    add_verify_argument(p)
    add_writer_arguments(p)
    a = p.parse_args(argv)
    opts = writer_options(a)
    verify = verify_inputs(a, "merge", a.public, *a.packages)
    merge(a.public, a.packages, a.out, top_k=a.top_k, norm_topk_prob=a.norm_topk_prob, routing=a.routing,
          shared=a.shared, router_rows=a.router_rows, router_cosine_temp=a.router_cosine_temp, verify=verify, **opts)
    return 0
