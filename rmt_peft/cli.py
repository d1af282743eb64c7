"""The ``rmt-peft`` command: train | validate | recipes | eval | export | ask | flops | env.

Each subcommand lives beside the code it drives; a module named here exposes
``register(subparsers)`` (adds its parser, cheap imports only: ``--help`` must not import torch)
and the parser's ``func``. Options of every command: ``-v`` (more output, tracebacks of user
errors), ``-q`` (errors only). A mistake in the input (``rmt_peft.errors.UserError``: a bad
recipe, a missing file, a Hub model that is not cached offline) and a write that failed for want of
space or permission (``rmt_peft.fileio.disk_error``) end the command with one line on stderr and
exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__, log
from .errors import UserError
from .fileio import disk_error

COMMAND_MODULES = [
    "rmt_peft.train.command",   # train, validate, recipes
    "rmt_peft.eval.command",    # eval
    "rmt_peft.hub_command",     # export
    "rmt_peft.ask_command",     # ask
    "rmt_peft.flops",           # flops
    "rmt_peft.env",             # env (versions and devices for bug reports)
]


def verbosity_options(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
                       help="more output: transformers' info logs, third-party warnings, tracebacks of user errors")
    group.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
                       help="errors only")


class Parser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line like every other error (argparse prints the usage
    first); the usage stays one --help away. Subcommands' parsers are of this class too."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (usage: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="rmt-peft", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"rmt-peft {__version__}")
    verbosity_options(parser, 0)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    for command in sub.choices.values():  # -v / -q after the command name too (SUPPRESS keeps the first)
        verbosity_options(command, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log.setup(args.verbosity)
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        # a mistake in the input, or a write that failed for want of space or permission
        # (fileio.disk_error: a full disk, a read-only folder): one line naming it; the traceback with -v
        problem = err if isinstance(err, UserError) else disk_error(err)
        if not isinstance(problem, UserError) or args.verbosity > 0:
            raise
        print(f"rmt-peft {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
