"""
The CLI as users run it, two ways:

- `run_cli`: ``empathy_models.cli.main`` in this process, on a thread of its own (the
  commands run their own event loop, and a test may already be inside one), with its
  own stdin, stdout, stderr, environment and working directory, and what a process
  would show: warnings on stderr, a traceback and exit status 1 for an exception that
  escapes.  Fast: no interpreter to start and no package to import.
- `run_cli_process`: ``python -m empathy_models`` in a subprocess, for what only a
  process shows (the entry point, a terminal, signals, the import itself).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_cli", "run_cli_process"]

_lock = threading.Lock()  # one in-process CLI at a time: it swaps process-wide state


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    for name, value in changes.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _show_warning(
    err: io.StringIO,
) -> Any:
    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: Any = None,
        line: str | None = None,
    ) -> None:
        err.write(warnings.formatwarning(message, category, filename, lineno, line))

    return show


def run_cli(
    home: Path,
    *args: str,
    cwd: Path | None = None,
    stdin: str = "",
    env: Mapping[str, str | None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """
    Run the CLI with ``args``, ``EMPATHY_HOME=home``, no ``EMPATHY_CONFIG`` from the
    caller's environment (unless ``env`` sets one), stdin not a terminal.
    """
    from empathy_models.cli import main

    out, err = io.StringIO(), io.StringIO()
    changes: dict[str, str | None] = {"EMPATHY_HOME": str(home), "EMPATHY_CONFIG": None}
    changes.update(env or {})
    result: list[int] = []

    def body() -> None:
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            err.write(traceback.format_exc())
            code = 1
        result.append(code)

    with (
        _lock,
        _environment(changes),
        contextlib.chdir(cwd or Path.cwd()),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("default")
        warnings.showwarning = _show_warning(err)
        saved_stdin = sys.stdin
        sys.stdin = io.StringIO(stdin)
        try:
            thread = threading.Thread(target=body, name="empathy-models CLI under test")
            thread.start()
            thread.join(110)
            if thread.is_alive():
                raise TimeoutError(f"empathy-models {' '.join(args)} did not finish in 110 s")
        finally:
            sys.stdin = saved_stdin
    return subprocess.CompletedProcess(
        ["empathy-models", *args], result[0], out.getvalue(), err.getvalue()
    )


def run_cli_process(
    home: Path, *args: str, cwd: Path | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    """
    Run ``python -m empathy_models *args`` with ``EMPATHY_HOME=home``, no
    ``EMPATHY_CONFIG`` from the caller's environment, and stdin not a terminal.
    """
    env = {k: v for k, v in os.environ.items() if k != "EMPATHY_CONFIG"}
    env["EMPATHY_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "empathy_models", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=110,
        check=False,
    )
