"""
The ``empathy-models`` command line (also ``python -m empathy_models``).

Command groups live in modules of this package, each exposing
``register(subparsers)``; adding a group is one line in `COMMANDS`.  Every command
that reads a database takes ``--db`` (default: the database named in ``empathy.toml``,
else ``$EMPATHY_HOME/empathy.db``; see ``empathy-models config show``); ``-v`` /
``--log-level`` (before the command) show the library's logs on stderr.  Exit codes:
0 success, 1 an error the command reports (missing or corrupt database, a refused
reset), 2 a usage error, 130 interrupted.  The CLI uses only the public API of
``empathy_models``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, cast

from empathy_models import EmpathyModelsError, NoModelMeetsConstraintsError, __version__

from ._common import CliError, Register, emit_json, printable, utf8

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS: tuple[str, ...] = (
    "auth",
    "routing",
    "breaker",
    "budget",
    "telemetry",
    "demo",
    "config",
)
"""Modules of ``empathy_models.cli`` whose ``register(subparsers)`` adds a command group."""


_LOG_LEVELS = ("debug", "info", "warning", "error")


class _UsageError(Exception):
    """A usage error argparse reported, with the parser that reported it."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An `argparse.ArgumentParser` whose usage errors reach `main` (for ``--json``)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every group in `COMMANDS` registered."""
    parser: argparse.ArgumentParser = _Parser(
        prog="empathy-models",
        description="Inspect and exercise empathy-models: routing, breakers, telemetry, auth.",
        epilog="Start with `empathy-models demo` (no API key needed).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="show the library's logs on stderr (-v: info, -vv: debug)",
    )
    parser.add_argument(
        "--log-level",
        choices=_LOG_LEVELS,
        default=None,
        help="show the library's logs from this level on (overrides -v)",
    )
    # every parser below is a _Parser too (argparse builds subparsers of the parent's class)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"{__name__}.{name}")
        register = cast(Register, module.register)
        register(subparsers)
    parser.set_defaults(func=None, help_parser=parser)
    return parser


@contextlib.contextmanager
def _library_logs(args: argparse.Namespace) -> Iterator[None]:
    """
    While a command runs, send the ``empathy_models`` loggers to stderr when -v or
    --log-level asks for it; the handler and level are removed afterwards.
    """
    level: int | None = None
    if args.log_level is not None:
        level = getattr(logging, args.log_level.upper())
    elif args.verbose:
        level = logging.INFO if args.verbose == 1 else logging.DEBUG
    if level is None:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("empathy_models")
    previous = package.level
    package.addHandler(handler)
    package.setLevel(level)
    try:
        yield
    finally:
        package.removeHandler(handler)
        package.setLevel(previous)


@contextlib.contextmanager
def _output_escaped() -> Iterator[None]:
    """
    While a command runs, a character stdout's encoding cannot hold (a CJK name on a
    Latin-1 terminal, or in a file on Windows) is written escaped as ``\\u652f``, not a
    UnicodeEncodeError; stdout is given back as it was.  (stderr escapes so already.)
    """
    out = sys.stdout
    reconfigure = getattr(out, "reconfigure", None)
    errors = getattr(out, "errors", None)
    if reconfigure is None or errors != "strict" or utf8(getattr(out, "encoding", None)):
        yield
        return
    reconfigure(errors="backslashreplace")
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):  # a closed or full output
            reconfigure(errors=errors)


def _error_json(exc: BaseException, code: int) -> dict[str, Any]:
    error: dict[str, Any] = {"type": type(exc).__name__, "message": str(exc), "exit_code": code}
    if isinstance(exc, NoModelMeetsConstraintsError):
        error["workflow"] = exc.workflow
        error["stage"] = exc.stage
        error["reasons"] = {model: list(why) for model, why in exc.reasons.items()}
    return {"error": error}


def _lines(message: str) -> str:
    """An error message for the terminal: each line's control characters escaped."""
    return "\n".join(printable(line) for line in message.split("\n"))


def _not_utf8(words: Sequence[str]) -> str | None:
    """
    The first of ``words`` that is not valid UTF-8, shown as its bytes, or None.

    Python hands over an argument whose bytes are not UTF-8 (``café`` typed in a
    Latin-1 terminal) with each bad byte as a lone surrogate, which no database,
    file or JSON output can hold.
    """
    for word in words:
        try:
            word.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = word.encode("utf-8", "surrogateescape")
            except UnicodeEncodeError:  # a surrogate no byte decodes to
                raw = word.encode("utf-8", "backslashreplace")
            return repr(raw)[1:]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the CLI with ``argv`` (default ``sys.argv[1:]``) and return the exit code.

    Errors of this package print ``empathy-models: error: <message>`` on stderr (no
    traceback) and return 1; usage errors return 2 with the usage line, but for an
    argument that is not valid UTF-8, refused (2) before any command runs.  With
    ``--json``, an error is also printed on stdout as ``{"error": {"type", "message",
    "exit_code", ...}}`` (a routing no-match adds ``workflow``, ``stage`` and the
    ``reasons`` of every candidate).  A command group without a subcommand, or no
    command at all, prints its help.  Ctrl-C anywhere in here, also while the
    commands' modules load, prints ``empathy-models: interrupted`` and returns 130
    (in a command's event loop, each Ctrl-C cancels the command, `run_async`; once it
    has ended, further ones are ignored until `main` returns).

    Without ``argv`` (as the ``empathy-models`` program), after a Ctrl-C SIGINT stays
    ignored: the process is exiting, and one more Ctrl-C must not cut its telemetry
    flush short.  With ``argv`` (called from a program of yours), the SIGINT handler
    it found is back when it returns.
    """
    as_program = argv is None
    # the handler to give back (a caller's thread cannot set handlers, nor need to)
    found = None if as_program or not _in_main_thread() else signal.getsignal(signal.SIGINT)
    try:
        return _main(argv)
    except KeyboardInterrupt:
        if as_program:
            _ignore_interrupts()
        print("empathy-models: interrupted", file=sys.stderr)
        return 130
    finally:
        if found is not None:
            signal.signal(signal.SIGINT, found)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _ignore_interrupts() -> None:
    """
    After a Ctrl-C the process is ending: one more, while it exits (the telemetry exit
    flush, the interpreter joining threads), must neither cut that short nor print a
    traceback (from the main thread only: a caller's thread cannot set handlers).
    """
    if _in_main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _main(argv: Sequence[str] | None) -> int:
    """`main` but for Ctrl-C, which reaches its caller."""
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    bad = _not_utf8(words)
    if bad is not None:
        message = (
            f"argument {bad} is not valid UTF-8: type it in UTF-8 (is the terminal set to "
            "another encoding?)"
        )
        print(f"empathy-models: error: {message}", file=sys.stderr)
        if "--json" in words:
            emit_json({"error": {"type": "UsageError", "message": message, "exit_code": 2}})
        return 2
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse: --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except _UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {_lines(str(exc))}", file=sys.stderr)
        if "--json" in words:
            emit_json({"error": {"type": "UsageError", "message": str(exc), "exit_code": 2}})
        return 2
    if args.func is None:
        args.help_parser.print_help()
        return 0
    try:
        with _library_logs(args), _output_escaped():
            code = int(args.func(args))
        sys.stdout.flush()  # a full disk shows here, not at exit
        return code
    except (CliError, EmpathyModelsError) as exc:
        code = exc.code if isinstance(exc, CliError) else 1
        shown = str(exc) if isinstance(exc, CliError) and exc.shown else _lines(str(exc))
        print(f"empathy-models: error: {shown}", file=sys.stderr)
        if getattr(args, "json", False):
            emit_json(_error_json(exc, code))
        return code
    except BrokenPipeError:
        # the reader went away (`| head`): not an error worth a traceback
        _discard_stdout()
        return 0
    except OSError as exc:
        if exc.filename is not None:  # a file a command opened: not the output
            raise
        # the output could not be written (a full disk, a closed terminal): say so once
        why = exc.strerror or str(exc)
        print(f"empathy-models: error: cannot write the output: {why}", file=sys.stderr)
        _discard_stdout()
        return 1


def _discard_stdout() -> None:
    """
    Point stdout at the null device, so that what is left in its buffer cannot fail
    again when the interpreter exits.
    """
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):  # not a file (a test's buffer)
        pass
