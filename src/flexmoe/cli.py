"""The `flexmoe` command: one subcommand per lifecycle step.

    flexmoe prepare-data FILES... --out DIR [--tokenizer bytes|DIR] [--format lm|sft]
    flexmoe train [Hydra overrides: out_dir=... +data.train.code=DIR stage=expert_anchor ...]
    flexmoe router-embed --model DIR --data DIR --out FILE [--public] [--embedder PATH]
    flexmoe branch PUBLIC OUT [--router-embedding FILE]
    flexmoe package TRAINED OUT --owner NAME --domain NAME [--licence L]
    flexmoe merge PUBLIC PACKAGE... --out DIR [--top-k K]
    flexmoe eval MODEL --data DOMAIN=DIR ... [--opt-out NAME,...] [--soup]
                 [--route-embedder PATH --domain-embedding NAME=FILE ...]
    flexmoe quickstart [recipe=flexolmo|bar] [out_dir=DIR] [key=value ...]
    flexmoe import-hf SRC DST            (Olmo2 / FlexOlmo Hugging Face directory -> native)
    flexmoe export-hf SRC DST            (native -> FlexOlmoForCausalLM / Olmo2ForCausalLM directory)
    flexmoe remove-expert SRC DST --expert NAME
    flexmoe generate MODEL --prompt TEXT [--attribution]  (with consent: --use commercial)
    flexmoe audit-extraction --data DIR --merged M --expert E --public P
    flexmoe consent MODEL                (the owners, their licences, uses and expiry)

    flexmoe --debug CMD ...              (a user error shows its traceback, as FLEXMOE_DEBUG=1 does)
"""

from __future__ import annotations

import os
import sys

from flexmoe.commands import COMMANDS


def main(argv: list[str] | None = None) -> int:
    """Entry point: dispatch to a subcommand; user errors become one line on stderr and exit 2.

    `flexmoe --debug CMD ...` (or FLEXMOE_DEBUG=1) keeps the traceback of a user error."""
    from flexmoe.commands.errors import EXIT_USER_ERROR, debug_enabled, user_error_message

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "--debug":
        before = os.environ.get("FLEXMOE_DEBUG")
        os.environ["FLEXMOE_DEBUG"] = "1"  # subcommands (Hydra's train) and their workers see it too
        try:
            return main(argv[1:])
        finally:  # an in-process caller (tests) gets its environment back
            if before is None:
                os.environ.pop("FLEXMOE_DEBUG", None)
            else:
                os.environ["FLEXMOE_DEBUG"] = before
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] in ("-V", "--version"):
        from importlib.metadata import PackageNotFoundError, version

        try:
            print(f"flexmoe {version('flexmoe')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            print("flexmoe (not installed)")
        return 0
    if argv[0] not in COMMANDS:
        print(f"flexmoe: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_USER_ERROR
    cmd = COMMANDS[argv[0]]  # imports only this command's module (and torch only if it needs it)
    from flexmoe.io.progress import output_settings

    try:
        with output_settings():  # a command's --quiet ends with it (in-process callers: tests)
            return cmd(argv[1:])
    except Exception as e:  # noqa: BLE001  (sorted below: a user's error or a bug)
        msg = user_error_message(e)
        if msg is None or debug_enabled():
            raise
        print(f"flexmoe {argv[0]}: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR


# Commands that leave nothing for an interpreter's shutdown to finish (no wandb run, no process
# group, no worker): once their output is flushed the process ends at once. Tearing down an
# interpreter that imported torch took 0.6-0.8 s here, a fifth of a 2 GB merge.
FAST_EXIT = frozenset({"merge", "branch", "remove-expert", "export-hf", "import-hf", "package", "consent"})


def run() -> None:
    """The `flexmoe` console script: `main`, then exit with its code (see FAST_EXIT)."""
    argv = sys.argv[1:]
    rc = main(argv)
    if next((a for a in argv if a != "--debug"), None) in FAST_EXIT:
        import logging

        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    run()
