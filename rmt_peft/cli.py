"""The ``rmt-peft`` command: train | validate | eval | export | ask | flops.

Each subcommand lives beside the code it drives; a module named here exposes
``register(subparsers)`` (adds its parser, cheap imports only) and the parser's ``func``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "rmt_peft.train.command",   # train, validate
    "rmt_peft.eval.command",    # eval
    "rmt_peft.hub_command",     # export
    "rmt_peft.ask_command",     # ask
    "rmt_peft.flops",           # flops
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt-peft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import UserError

    try:
        return int(args.func(args) or 0)
    except UserError as err:  # a mistake in the input: one line naming it, no traceback
        print(f"rmt-peft {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
