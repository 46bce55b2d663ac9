"""
The ``empathy-models`` command line (also ``python -m empathy_models``).

Command groups live in modules of this package, each exposing
``register(subparsers)``; adding a group is one line in `COMMANDS`.  Every command
takes ``--db`` (default: the database named in ``empathy.toml``, else
``$EMPATHY_HOME/empathy.db``; see ``empathy-models config show``).  Exit codes: 0 success, 1 an
error the command reports (missing or corrupt database, a refused reset), 2 a usage
error, 130 interrupted.  The CLI uses only the public API of ``empathy_models``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import cast

from empathy_models import EmpathyModelsError, __version__

from ._common import CliError, Register

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[str, ...] = (
    "auth",
    "routing",
    "breaker",
    "telemetry",
    "demo",
    "config",
)
"""Modules of ``empathy_models.cli`` whose ``register(subparsers)`` adds a command group."""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every group in `COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="empathy-models",
        description="Inspect and exercise empathy-models: routing, breakers, telemetry, auth.",
        epilog="Start with `empathy-models demo` (no API key needed).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        register = cast(Register, module.register)
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Errors of this package print ``empathy-models: error: <message>`` on stderr (no
    traceback) and return 1; usage errors return 2 with the usage line.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"empathy-models: error: {exc}", file=sys.stderr)
        return exc.code
    except EmpathyModelsError as exc:
        print(f"empathy-models: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("empathy-models: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`| head`): not an error worth a traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
