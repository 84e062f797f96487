"""One module per `flexmoe` subcommand, named like it (`remove-expert` -> `remove_expert.py`).

Each module's `main(argv) -> int` parses its arguments and calls the library layer that does the
work; `cli.py` only dispatches. Modules are imported on demand so that, for example, a bad
`flexmoe train` override is refused before torch is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Callable, Iterator

# command name -> module under flexmoe.commands, in the order `flexmoe --help` lists them
NAMES = {
    "prepare-data": "prepare_data", "train": "train", "router-embed": "router_embed", "branch": "branch",
    "package": "package", "merge": "merge", "eval": "eval", "quickstart": "quickstart",
    "import-hf": "import_hf", "export-hf": "export_hf", "remove-expert": "remove_expert",
    "generate": "generate", "audit-extraction": "audit_extraction", "consent": "consent",
    "checkpoint-to-model": "checkpoint_to_model",
}


class _Commands(Mapping):
    """name -> `main` of its module, imported when first looked up."""

    def __getitem__(self, name: str) -> Callable[[list[str]], int]:
        return importlib.import_module(f"flexmoe.commands.{NAMES[name]}").main

    def __iter__(self) -> Iterator[str]:
        return iter(NAMES)

    def __len__(self) -> int:
        return len(NAMES)


COMMANDS: Mapping[str, Callable[[list[str]], int]] = _Commands()
