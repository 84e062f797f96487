"""Recipes built from the library: `flexmoe quickstart` (FlexOlmo) and `recipe=bar` (post-training)."""

from __future__ import annotations

from typing import Any

RECIPES = ("flexolmo", "bar")


def quickstart_main(argv: list[str]) -> dict[str, Any]:
    """`flexmoe quickstart [recipe=flexolmo|bar] key=value ...`: parse the recipe's settings and run it."""
    recipe = "flexolmo"
    for item in argv:
        key, _, value = item.partition("=")
        if key == "recipe":
            recipe = value
    if recipe not in RECIPES:
        raise ValueError(f"quickstart: recipe={recipe!r} is not one of {', '.join(RECIPES)}")
    if recipe == "bar":
        from flexmoe.recipes.bar import BarConfig, run_bar_quickstart

        return run_bar_quickstart(BarConfig.from_overrides(argv))
    from flexmoe.recipes.flexolmo import QuickstartConfig, run_quickstart

    return run_quickstart(QuickstartConfig.from_overrides(argv))
