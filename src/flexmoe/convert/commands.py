"""CLI subcommands for Hugging Face interop and release tools (wired into `flexmoe` by cli.py)."""

COMMANDS: dict = {}
