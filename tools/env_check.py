#!/usr/bin/env python
"""Environment check for operators: what this node has, and what flexmoe will choose on it.

    python tools/env_check.py          # a table
    python tools/env_check.py --json   # one JSON object (for job logs)

Exit code 0 when flexmoe can train here (torch imports, the Hydra config tree is found), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    problems: list[str] = []
    try:
        from flexmoe.train.hardware import describe_machine
    except ImportError as e:
        print(f"env_check: flexmoe or torch does not import ({e}); install with `make install`", file=sys.stderr)
        return 1
    info = describe_machine()
    try:
        from flexmoe.commands.train import conf_dir

        conf = conf_dir()
        info["conf_dir"] = str(conf)
        if not (conf / "train.yaml").is_file():
            problems.append(f"no Hydra config tree at {conf} (set FLEXMOE_CONF)")
    except Exception as e:  # noqa: BLE001 - a check reports, it does not stop at the first problem
        problems.append(f"config tree: {e}")
    info["problems"] = problems
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
