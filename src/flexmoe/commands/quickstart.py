"""`flexmoe quickstart`: the whole lifecycle on built-in text; writes report.md and report.json."""

from __future__ import annotations


def main(argv: list[str]) -> int:
    """`flexmoe quickstart`: the whole lifecycle on built-in text; writes report.md and report.json.

    `recipe=bar`: the post-training version (SFT experts on built-in chat data, merged with
    shared=average|public, router tuning); writes bar_report.md and bar_report.json.
    """
    from flexmoe.recipes import quickstart_main

    quickstart_main(argv)
    return 0
