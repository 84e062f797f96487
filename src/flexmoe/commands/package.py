"""`flexmoe package`: cut the trained expert out as a data-free package."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe package`: cut the trained expert out as a data-free package.

    With `--fit-router OWN_DATA` the owner also fits, on its own data (and `--fit-router-public`
    public text), one top-k router row per layer against the public row and ships it in the
    package (recipes/owner_router.py); `flexmoe merge --routing topk --calibrate owner` stacks them."""
    from flexmoe.commands.common import add_consent_arguments
    from flexmoe.flex.package import FITTED_TARGETS, make_package

    p = argparse.ArgumentParser(prog="flexmoe package", description=main.__doc__)
    p.add_argument("trained")
    p.add_argument("out")
    p.add_argument("--owner", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--licence", default="unspecified")
    add_consent_arguments(p)
    g = p.add_argument_group("owner-fitted top-k router rows (experimental; docs/routing.md)")
    g.add_argument("--fit-router", metavar="OWN_DATA",
                   help="prepared token directory of the owner's own data: fit and ship top-k router rows")
    g.add_argument("--fit-router-public", metavar="DIR", help="prepared public tokens (text the expert should not take)")
    g.add_argument("--fit-router-windows", type=int, default=32, metavar="N", help="own-data windows (default 32)")
    g.add_argument("--fit-router-public-windows", type=int, default=32, metavar="N",
                   help="public windows (default 32)")
    g.add_argument("--fit-router-target", default="pair", choices=FITTED_TARGETS,
                   help="pair: own text -> anchor + own expert, public text -> the document router (default); "
                        "doc: the document router everywhere; own: as pair, own text -> Q on the own expert")
    g.add_argument("--fit-router-own-weight", type=float, default=0.9, metavar="Q",
                   help="target own: the own expert's weight on own-data tokens (default 0.9)")
    g.add_argument("--fit-router-a0", type=float, default=0.1, metavar="W",
                   help="weight of tokens the target gives to the anchor alone (default 0.1)")
    g.add_argument("--fit-router-steps", type=int, default=300, metavar="N", help="Adam steps per layer (default 300)")
    g.add_argument("--fit-router-seq-len", type=int, default=256, metavar="S")
    a = p.parse_args(argv)
    fitted = None
    if a.fit_router:
        from flexmoe.io.log import get_logger
        from flexmoe.recipes.owner_router import OwnerFitConfig, fit_package_rows

        cfg = OwnerFitConfig(own_data=a.fit_router, public_data=a.fit_router_public, own_windows=a.fit_router_windows,
                             public_windows=a.fit_router_public_windows, seq_len=a.fit_router_seq_len,
                             steps=a.fit_router_steps, anchor_only_weight=a.fit_router_a0, target=a.fit_router_target,
                             own_weight=a.fit_router_own_weight)
        cfg.validate()  # a bad setting: one line naming it, exit 2 (cli.main)
        fitted = fit_package_rows(a.trained, cfg, log=get_logger(__name__).info)
    elif a.fit_router_public:
        raise ValueError("--fit-router-public needs --fit-router OWN_DATA")
    print(make_package(a.trained, a.out, owner=a.owner, domain=a.domain, licence=a.licence,
                       allowed_uses=a.allowed_uses, expires=a.expires, fitted_router=fitted))
    return 0
