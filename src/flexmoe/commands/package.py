"""`flexmoe package`: cut the trained expert out as a data-free package."""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> int:
    """`flexmoe package`: cut the trained expert out as a data-free package."""
    from flexmoe.commands.common import add_consent_arguments
    from flexmoe.flex.package import make_package

    p = argparse.ArgumentParser(prog="flexmoe package", description=main.__doc__)
    p.add_argument("trained")
    p.add_argument("out")
    p.add_argument("--owner", required=True)
    p.add_argument("--domain", required=True)
    p.add_argument("--licence", default="unspecified")
    add_consent_arguments(p)
    a = p.parse_args(argv)
    print(make_package(a.trained, a.out, owner=a.owner, domain=a.domain, licence=a.licence,
                       allowed_uses=a.allowed_uses, expires=a.expires))
    return 0
