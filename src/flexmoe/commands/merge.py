"""`flexmoe merge`: public model + expert packages -> one (N+1)-expert model."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe merge`: public model + expert packages -> one (N+1)-expert model."""
    from flexmoe.config.model import ROUTINGS
    from flexmoe.commands.common import (add_verify_argument, add_writer_arguments, inputs_hashed_aside, verify_inputs,
                                         writer_options)

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
                   help="rescale router rows at merge time (see flex/merge_router.py ROW_TRANSFORMS)")
    p.add_argument("--router-cosine-temp", type=float, default=0.0, metavar="T",
                   help="route by cosine similarity of hidden state and row over temperature T (0: dot product)")
    p.add_argument("--calibrate", choices=["rows", "rows+bias", "bias", "owner"],
                   help="with --routing topk: refit the router rows (rows+bias, bias: also FlexOlmo's non-positive "
                        "biases, native only) so per-token top-k imitates the document router, on public text and "
                        "text sampled from each owner's own model (recipes/calibrate.py; needs n-gram profiles); "
                        "owner: stack the rows each owner fitted on its own data and shipped in its package "
                        "(`flexmoe package --fit-router`, recipes/owner_router.py)")
    p.add_argument("--calibrate-data", metavar="DIR",
                   help="prepared public token directory (prepare-data) for calibration text")
    p.add_argument("--calibrate-windows", type=int, default=96, metavar="N", help="public windows (default 96)")
    p.add_argument("--calibrate-generated", type=int, default=32, metavar="N",
                   help="sequences sampled from each owner's model (default 32)")
    p.add_argument("--calibrate-seq-len", type=int, default=256, metavar="S")
    p.add_argument("--calibrate-steps", type=int, default=300, metavar="N", help="Adam steps per layer (default 300)")
    add_verify_argument(p)
    add_writer_arguments(p)
    a = p.parse_args(argv)
    calibrate = None
    if a.calibrate == "owner":
        if a.routing not in ("auto", "topk"):
            raise ValueError(f"--calibrate owner stacks top-k router rows; it needs --routing topk, not {a.routing}")
        if a.calibrate_data:
            raise ValueError("--calibrate owner fits nothing at merge time; --calibrate-data is for rows|rows+bias|bias")
        from flexmoe.recipes.owner_router import owner_rows_merge

        opts = writer_options(a)
        verify = verify_inputs(a, "merge", a.public, *a.packages)
        owner_rows_merge(a.public, a.packages, a.out, top_k=a.top_k, norm_topk_prob=a.norm_topk_prob, shared=a.shared,
                         router_rows=a.router_rows, verify=verify, **opts)
        return 0
    if a.calibrate:
        from flexmoe.recipes.calibrate import CalibrationConfig

        if a.routing not in ("auto", "topk"):
            p.error(f"--calibrate fits top-k router rows; it needs --routing topk, not {a.routing}")
        calibrate = CalibrationConfig(mode=a.calibrate, public_data=a.calibrate_data, public_windows=a.calibrate_windows,
                                      generated_per_owner=a.calibrate_generated, seq_len=a.calibrate_seq_len,
                                      steps=a.calibrate_steps)
        try:
            calibrate.validate()
        except ValueError as e:
            p.error(str(e))
    elif a.calibrate_data:
        p.error("--calibrate-data needs --calibrate")
    opts = writer_options(a)
    verify = verify_inputs(a, "merge", a.public, *a.packages)
    if verify and calibrate is None:
        with inputs_hashed_aside([a.public], a.packages, fingerprint_of=a.public):
            return _merge(a, verify, opts)
    if calibrate is not None:
        from flexmoe.recipes.calibrate import calibrated_merge

        calibrated_merge(a.public, a.packages, a.out, calibrate, top_k=a.top_k, norm_topk_prob=a.norm_topk_prob,
                         shared=a.shared, router_rows=a.router_rows, verify=verify, **opts)
        return 0
    return _merge(a, verify, opts)


def _merge(a: argparse.Namespace, verify: bool, opts: dict) -> int:
    from flexmoe.flex.merge import merge

    merge(a.public, a.packages, a.out, top_k=a.top_k, norm_topk_prob=a.norm_topk_prob, routing=a.routing,
          shared=a.shared, router_rows=a.router_rows, router_cosine_temp=a.router_cosine_temp, verify=verify, **opts)
    return 0
