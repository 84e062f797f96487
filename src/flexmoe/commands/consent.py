"""`flexmoe consent`: show a merged model's (or a package's) consent registry; with --use, who is active."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    """`flexmoe consent`: show a merged model's (or a package's) consent registry; with --use, who is active."""
    from flexmoe.commands.common import add_verify_argument, verify_inputs
    from flexmoe.flex.consent import consent_mask, consent_rows
    from flexmoe.flex.package import read_package
    from flexmoe.io.native import open_native

    p = argparse.ArgumentParser(prog="flexmoe consent", description=main.__doc__)
    p.add_argument("path", help="merged model directory, or an expert package directory")
    p.add_argument("--use", help="show which experts a request for this use activates")
    p.add_argument("--date", help="the date consent is checked for (default: today, UTC)")
    p.add_argument("--json", action="store_true")
    add_verify_argument(p)
    a = p.parse_args(argv)
    path = Path(a.path)
    verify = verify_inputs(a, "consent", path)
    if (path / "manifest.json").exists():  # an expert package: the manifest and its files checked like merge does
        m, _ = read_package(path, verify)
        experts, checked = [dict(m, slot=1)], None
        if a.use:
            consent_mask(experts, a.use, a.date)  # validates the use name
        rows = consent_rows([{"owner": "public", "domain": "public"}] + experts, a.use, a.date)[1:]
    else:
        # Streaming: file sha256s and every expert's tensor_sha256, without loading the weights.
        cfg, _, meta = open_native(path, verify=verify)
        experts = meta.get("experts") or []
        checked = sum(bool(e.get("tensor_sha256")) for e in experts) if verify and cfg.is_moe else 0
        if a.use:
            consent_mask(experts, a.use, a.date)  # validates the use name
        rows = consent_rows(experts, a.use, a.date)
    if a.json:
        print(json.dumps({"experts": rows, "tensor_hashes_checked": checked}, indent=1))
        return 0
    head = f"{'slot':>4}  {'owner':<18} {'domain':<14} {'licence':<14} {'uses':<22} {'expires':<10}  eps"
    print(head + ("  active" if a.use else ""))
    for r in rows:
        uses = ",".join(r["allowed_uses"]) if r["allowed_uses"] else "(none recorded)"
        eps = f"{r['dp_epsilon']:.2f}" if isinstance(r["dp_epsilon"], (int, float)) else "-"
        line = (f"{r['slot']:>4}  {str(r['owner']):<18} {str(r['domain']):<14} {str(r['licence']):<14} {uses:<22} "
                f"{str(r['expires'] or '-'):<10}  {eps}")
        print(line + (f"  {'yes' if r['active'] else 'no'}" if a.use else ""))
    if checked is not None:
        print(f"tensor hashes checked: {checked} of {len(rows)} experts", file=sys.stderr)
    return 0
