"""Shared plumbing of the CLI: options, database resolution, tables, JSON, progress, errors."""

from __future__ import annotations

import argparse
import ast
import asyncio
import codecs
import contextlib
import json
import logging
import math
import os
import shlex
import shutil
import signal
import stat
import sys
import threading
import time
import unicodedata
from collections.abc import Awaitable, Callable, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Protocol, TypeAlias, TypeVar
from urllib.parse import quote, unquote, urlsplit

import anyio

from empathy_models._urls import KEYWORD_DSN, KEYWORD_DSN_REFUSED
from empathy_models.auth import empathy_home
from empathy_models.backends import redact_url

__all__ = [
    "CliError",
    "Progress",
    "Register",
    "SubParsers",
    "MAX_DAYS",
    "NO_NAME",
    "Shown",
    "add_common",
    "ask",
    "configured_registry_file",
    "configured_url",
    "number_arg",
    "db_url",
    "db_path",
    "display_width",
    "emit_json",
    "fmt_ms",
    "fmt_pct",
    "fmt_usd",
    "path_arg",
    "print_pairs",
    "print_table",
    "printable",
    "private_file",
    "read_only",
    "refuse_missing_schema",
    "run_async",
    "shown_name",
    "secret_in_path",
    "sqlite_file",
    "sqlite_url",
    "stdin_is_terminal",
    "typed_key",
    "typed_name",
    "utf8",
    "utf8_output",
]

T = TypeVar("T")

SubParsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


MAX_DAYS = 36_500
"""The longest time window a command takes (100 years; a datetime cannot hold much more)."""


def number_arg(
    kind: type[int] | type[float],
    *,
    minimum: float,
    strict: bool = False,
    maximum: float | None = None,
    what: str = "a number",
    too_big: str = "",
) -> Callable[[str], Any]:
    """
    An argparse ``type=`` that parses ``kind`` and checks its range (a float finite), so
    a bad value is a usage error (exit 2) naming the value, never a traceback.  ``strict`` makes the
    minimum exclusive; ``maximum`` is inclusive (``too_big`` adds a hint to its message).
    """

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value in (math.inf, -math.inf):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
        if strict and not value > minimum:
            raise argparse.ArgumentTypeError(f"must be > {minimum:g}, got {text}")
        if not strict and not value >= minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        if maximum is not None and value > maximum:
            most = f"{maximum:,}" if isinstance(maximum, int) else f"{maximum:g}"
            raise argparse.ArgumentTypeError(f"must be at most {most}{too_big}, got {text}")
        return value

    return parse


class Register(Protocol):
    """What a command module exposes: ``register(subparsers)`` adds its parser."""

    def __call__(self, subparsers: SubParsers) -> None: ...


class CliError(Exception):
    """
    An error to show as ``empathy-models: error: <message>`` with exit ``code``;
    ``shown``: the message is already safe to print (its names made so by `shown_name`
    or ``repr``), so it is not escaped again.
    """

    def __init__(self, message: str, code: int = 1, *, shown: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.shown = shown


# --------------------------------------------------------------------------- options


def default_db_path() -> Path:
    """``$EMPATHY_HOME/empathy.db`` (resolved now)."""
    return empathy_home() / "empathy.db"


def add_common(
    parser: argparse.ArgumentParser,
    *,
    json_flag: bool = True,
    db: bool = True,
    db_help: str | None = None,
) -> None:
    """
    Add ``--db`` (commands that read a database; ``db_help`` replaces its help) and
    ``--json`` (where scripts want it).
    """
    if db:
        parser.add_argument(
            "--db",
            metavar="URL_OR_PATH",
            default=None,
            help=db_help
            or "SQLite file or backend URL (default: the one named in empathy.toml, else "
            "$EMPATHY_HOME/empathy.db; see `empathy-models config show`)",
        )
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _sqlite_path(url: str) -> str | None:
    """
    The file path of a ``sqlite://`` URL (a leading ``~`` expanded), None for
    ``:memory:`` (or unparseable).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.netloc:
        return None
    # the file's bytes (a name not valid UTF-8 included), as the backend opens it
    path = unquote(
        parts.path[1:] if parts.path.startswith("/") else parts.path, "utf-8", "surrogateescape"
    )
    # a leading ~ expanded, as the backend expands it (a ~user it cannot: the backend says so)
    return None if path in ("", ":memory:") else os.path.expanduser(path)


def sqlite_file(url: str) -> Path | None:
    """The file a ``sqlite://`` URL opens (None for another backend, or in memory)."""
    if url.partition("://")[0].lower() != "sqlite":
        return None
    path = _sqlite_path(url)
    return None if path is None else Path(path)


def _in_memory(url: str) -> bool:
    """True for ``sqlite://:memory:`` and ``sqlite:///:memory:`` (with or without options)."""
    rest = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    return unquote(rest.removeprefix("/")) == ":memory:"


def expanded(path: str | Path) -> Path:
    """
    ``path`` with a leading ``~`` or ``~user`` expanded.

    Raises:
        CliError: ``~user`` for a user without a home directory.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:  # the user does not exist, or has no home directory
        raise CliError(
            f"cannot expand {str(path)!r}: no home directory for that user; write the path in full"
        ) from None


def path_arg(text: str) -> Path:
    """
    An argparse ``type=`` for a file path: ``text`` with a leading ``~`` or ``~user``
    expanded (the shell leaves a quoted one, or one after ``--option=``, as it is); a
    ``~user`` without a home directory is a usage error.
    """
    try:
        return expanded(text)
    except CliError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def private_file(path: Path) -> int:
    """
    ``path`` opened for writing, emptied, as a file only its owner can read: created
    0600, or, a regular file of this user's already there, with its group and other
    permissions taken off (0600 only applies to a file the open creates).  The
    descriptor is the caller's to close.

    Raises:
        OSError: the file cannot be opened or its permissions changed.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o077 and st.st_uid == os.geteuid():
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~0o077)
    except BaseException:
        os.close(fd)
        raise
    return fd


def sqlite_url(path: Path) -> str:
    """``sqlite:///`` + the absolute, percent-quoted path (``?`` and ``#`` survive, and
    the bytes of a name that is not valid UTF-8)."""
    return "sqlite:///" + quote(os.fsencode(expanded(path).absolute()))


def configured_url(kind: str = "telemetry") -> str:
    """
    The ``telemetry`` (or ``state``) URL of the configuration (``empathy.toml``, found
    as the SDK finds it; the default ``$EMPATHY_HOME/empathy.db`` without one).
    """
    from empathy_models.config import EmpathyConfig

    config = EmpathyConfig.load()
    return config.state_url if kind == "state" else config.telemetry_url


def configured_registry_file() -> Path | None:
    """The registry file named by the configuration (None: the built-in table)."""
    from empathy_models.config import EmpathyConfig

    return EmpathyConfig.load().registry_file


def read_only(url: str, *, writes: bool = False) -> dict[str, Any]:
    """
    Backend options for a command that only reads ``url``: PostgreSQL is told not to
    create its schema and tables (a misspelt ``?schema=`` is an error, not a new
    schema); SQLite opens the file read-only (nothing created, migrated or switched to
    WAL; read commands also require the file to exist, see `db_url`).  A command that
    changes an existing store (``breaker reset``) passes ``writes=True``: SQLite is then
    opened for writing.
    """
    scheme = url.partition("://")[0].lower()
    if scheme in ("postgres", "postgresql"):
        return {"create": False}
    return {"read_only": True} if scheme == "sqlite" and not writes else {}


S = TypeVar("S")


async def refuse_missing_schema(
    url: str,
    open_store: Callable[..., AbstractAsyncContextManager[S]],
    read: Callable[[S], Awaitable[object]],
) -> None:
    """
    Before a command writes to a PostgreSQL store: open it as `read_only` does
    (nothing created) and ``read`` it, so that a ``?schema=`` holding no empathy-models
    tables (a misspelt one) is an error, as a SQLite file that does not exist is, not
    a new schema written to where no worker reads.  A schema holding some (telemetry
    only) passes: the write then makes the store's own tables.  Other backends: nothing.
    """
    if url.partition("://")[0].lower() not in ("postgres", "postgresql"):
        return
    async with open_store(url, **read_only(url)) as store:
        await read(store)


def db_path(value: str) -> Path:
    """
    The SQLite file a ``--db`` value without ``scheme://`` names, absolute (a leading
    ``~`` expanded).

    Raises:
        CliError: (exit 2) for a PostgreSQL keyword/value connection string (``host=db
            password=... dbname=x``) that names no existing file, said without quoting
            it: it may hold the password.
    """
    path = expanded(value).absolute()
    if KEYWORD_DSN.match(value) and not path.exists():
        raise CliError(f"--db: {KEYWORD_DSN_REFUSED}", 2)
    return path


def secret_in_path(file: Path) -> str | None:
    """
    ``file`` masked as `redact_url` masks it, when its name may hold a secret: a
    ``password=...``, or a ``user:password@host`` typed without its scheme (a ':'
    before the last '@'); None for any other path (an '@' alone is kept: ``me@work.db``).
    """
    text = str(file)
    if ":" in text.rpartition("@")[0]:
        masked = redact_url(text)
    else:  # each '@' kept (a path holds no NUL): only a password=... is masked
        masked = redact_url(text.replace("@", "\0")).replace("\0", "@")
    return None if masked == text else masked


def _not_found(file: Path, *, given: bool, kind: str) -> CliError:
    """
    "database not found" for ``file``; a path that may hold a secret (`secret_in_path`)
    is shown masked, and without the hint that would quote it whole.  Not ``given``
    (the configured default, read when ``--db`` is left out), the hint says where the
    SDK writes instead, and lists the SQLite files in the working directory: the
    quick start's ``calls.db`` is one.
    """
    masked = secret_in_path(file)
    if masked is not None:
        return CliError(
            f"database not found: {masked} (a backend URL starts with its scheme: "
            "postgresql://..., redis://...)"
        )
    demo = f"`empathy-models demo --db {shlex.quote(str(file))}`"
    if given:
        hint = f"pass --db PATH, or create one with {demo}"
    else:
        what = "telemetry_store=" if kind == "telemetry" else "quota_store= or breaker store="
        hint = (
            "--db left out: the configured database, see `empathy-models config show`; pass "
            f"the file your code's {what} names, --db calls.db for 'sqlite:///calls.db', "
            f"or name it in empathy.toml; {demo} fills this one with sample calls"
        )
        try:
            here = sorted(p.name for p in Path.cwd().glob("*.db") if p.is_file())
        except OSError:  # a working directory removed or unreadable: no list
            here = []
        if here:
            hint += f"; SQLite files here: {', '.join(shown_name(name) for name in here[:8])}"
    return CliError(f"database not found: {file} ({hint})")


def db_url(value: str | None, *, must_exist: bool = True, kind: str = "telemetry") -> str:
    """
    The backend URL for ``--db``: a URL passes through, a path becomes ``sqlite:///<abs>``;
    without ``--db``, the configuration's ``telemetry`` (or, with ``kind="state"``,
    ``state``) URL.

    With ``must_exist`` a SQLite file that does not exist, or an in-memory SQLite
    database (new and empty), raises `CliError` (so a read command never creates an
    empty database behind the user's back).
    """
    if value is not None and not value.strip():
        raise CliError("--db is empty: pass a database file or a backend URL", 2)
    raw = value if value is not None else configured_url(kind)
    if "://" in raw:
        url = raw
        try:
            scheme = urlsplit(raw).scheme.lower()
        except ValueError:  # the backend factory names what is wrong with it
            scheme = ""
        path = _sqlite_path(raw) if scheme == "sqlite" else None
        if must_exist and scheme == "sqlite" and _in_memory(raw):
            raise CliError(
                f"{printable(raw)} is an in-memory database, new and empty: this command "
                "reads a database file (pass --db PATH, or a sqlite:///path URL)"
            )
    else:
        path = str(db_path(raw))
        url = sqlite_url(Path(path))
    if must_exist and path is not None:
        file = Path(path)
        if file.is_dir():
            raise CliError(f"database {file} is a directory, not a SQLite file")
        if not file.exists():
            raise _not_found(file, given=value is not None, kind=kind)
    return url


# --------------------------------------------------------------------------- output


_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Characters that reorder the text around them on a terminal (a name could spoof another)."""

_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r", "\\": "\\\\"}


def _escaped(char: str) -> str:
    if char in _ESCAPES:
        return _ESCAPES[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """
    ``text`` safe to print on a terminal: control characters (``ESC``, ``CR``, newlines,
    tabs, ``DEL``, C1 codes), line and paragraph separators, bidirectional controls and
    lone surrogates are shown as ``repr`` shows them (``\\x1b``, ``\\r``, ``\\n``,
    ``\\u202e``), so a recorded name can neither colour, overwrite nor split a line;
    a backslash is doubled, so a typed ``\\n`` and a real newline look different.
    Every other character, wide or accented, is kept.  ``--json`` output is never
    escaped this way (JSON has escapes of its own).
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        _escaped(c)
        if c == "\\" or unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in _BIDI_CONTROLS
        else c
        for c in text
    )


NO_NAME = "(none)"
"""How a table shows the workflow or stage of calls recorded without one."""

_QUOTES = ("'", '"')


def _plain(name: str) -> bool:
    """
    True when ``name`` can be shown as it is: every character visible or a plain space
    (`str.isprintable`), no space at either end, no backslash, not starting with a
    quote (a shown name in quotes is always a quoted one) and not `NO_NAME`.
    """
    return (
        name.isprintable()
        and "\\" not in name
        and not name[0].isspace()
        and not name[-1].isspace()
        and not name.startswith(_QUOTES)
        and name != NO_NAME
    )


class Shown(str):
    """Text already made safe to print (`shown_name`): tables print it as it is, left-aligned."""

    __slots__ = ()


def shown_name(name: str | None) -> Shown:
    """
    A name (breaker key, workflow, stage, model) as the CLI shows it, told apart from
    every other: as it is when that is unambiguous, `NO_NAME` for ``None`` or ``""``
    (the calls recorded without one), otherwise quoted as ``repr`` quotes it, so that
    spaces at either end, non-breaking and zero-width spaces, control and bidirectional
    characters and backslashes are visible (``'openai '``, ``'open\\u200bai'``).
    `typed_name` reads every form back.
    """
    if not name:
        return Shown(NO_NAME)
    return Shown(name if _plain(name) else repr(name))


def typed_name(text: str) -> str:
    """
    The name a command-line argument means: ``text`` as it is, ``""`` for `NO_NAME`,
    and the name a quoted form (``'openai '``, as `shown_name` shows it, or in double
    quotes) stands for, when that name needs quoting.  Any other argument in quotes is
    taken as it is.

    Raises:
        argparse.ArgumentTypeError: (a usage error) a quoted form standing for text
            with a lone surrogate (``'\\ud800'``), which no name can hold, nor a
            store encode.
    """
    if text == NO_NAME:
        return ""
    if len(text) < 2 or not text.startswith(_QUOTES) or not text.endswith(text[0]):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    if isinstance(value, str) and value and not _plain(value):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise argparse.ArgumentTypeError(
                "the quoted name stands for text holding a lone surrogate, which is not "
                "valid UTF-8 and no name can hold"
            ) from None
        return value
    return text


def typed_key(text: str) -> str:
    """A breaker key as typed (`typed_name`; a key is never empty, so `NO_NAME` is itself)."""
    return text if text == NO_NAME else typed_name(text)


def display_width(text: str) -> int:
    """
    The columns ``text`` takes on a terminal: East Asian wide and fullwidth characters
    take two, combining marks and zero-width format characters none.
    """
    if text.isascii():
        return len(text)
    width = 0
    for char in text:
        if unicodedata.combining(char) or unicodedata.category(char) in ("Me", "Cf"):
            continue
        width += 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1
    return width


def _title(title: str) -> str:
    """A table's title, escaped unless it is `Shown` (built from names already shown)."""
    return str(title) if isinstance(title, Shown) else printable(title)


def _cell(value: object) -> str:
    if isinstance(value, Shown):
        return str(value)
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return printable(str(value))


_MIN_COLUMN = 8
"""A column that may be cut is never narrowed below this many columns (or its header)."""


def _fit(widths: list[int], floors: Sequence[int | None], limit: int) -> list[int] | None:
    """
    Narrow the widest columns that may be cut (a ``floors`` entry that is not None: the
    narrowest each may get) until the row fits ``limit`` columns; None when it cannot.
    """
    fitted = list(widths)
    total = sum(fitted) + 2 * (len(fitted) - 1)
    while total > limit:
        candidates = [
            i for i, w in enumerate(fitted) if (floor := floors[i]) is not None and w > floor
        ]
        if not candidates:
            return None
        widest = max(candidates, key=lambda i: fitted[i])
        fitted[widest] -= 1
        total -= 1
    return fitted


def _clip(text: str, width: int) -> str:
    if display_width(text) <= width:
        return text
    kept, used = [], 0
    for char in text:
        w = display_width(char)
        if used + w > width - 1:
            break
        kept.append(char)
        used += w
    return "".join(kept) + "…"


def _pad(text: str, width: int, *, right: bool) -> str:
    room = " " * max(0, width - display_width(text))
    return room + text if right else text + room


def print_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    *,
    title: str | None = None,
    file: IO[str] | None = None,
    width: int | None = None,
    cut: Collection[str] = (),
) -> None:
    """
    Print ``rows`` under ``headers`` in aligned columns; numbers are right-aligned.

    ``None`` prints as ``-``; control characters in cells are escaped (`printable`),
    but for `Shown` cells (names as `shown_name` shows them), printed as they are and
    never right-aligned as numbers; wide characters count as two columns.  An empty
    table prints the headers and ``(no rows)``.  Rows fit ``width`` columns (default:
    the terminal's width when printing to a terminal, unlimited otherwise, so pipes
    and files get every character).  Only the free-text columns named in ``cut`` (an
    error, a reason) may be shortened to fit, their long cells ending in ``…``;
    identifiers, numbers, times and headers are never cut.  When the row cannot fit
    that way, each row is printed as a block of ``header  value`` lines instead (as
    ``psql``'s expanded display).
    """
    out = file if file is not None else sys.stdout
    if width is None and _isatty(out):
        width = shutil.get_terminal_size().columns
    cells = [[_cell(v) for v in row] for row in rows]
    encoding = getattr(out, "encoding", None)
    if encoding is not None and not utf8(encoding):
        # what the output cannot encode is escaped before the columns are measured
        cells = [[_encodable(text, encoding) for text in row] for row in cells]
    widths = [display_width(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], display_width(text))
    numeric = [
        bool(rows)
        and all(
            isinstance(row[i], int | float)
            or row[i] is None
            or (not isinstance(row[i], Shown) and _looks_numeric(cells[r][i]))
            for r, row in enumerate(rows)
        )
        for i in range(len(headers))
    ]
    if width is not None and cells:
        floors = [
            max(display_width(h), min(_MIN_COLUMN, widths[i])) if h in cut else None
            for i, h in enumerate(headers)
        ]
        fitted = _fit(widths, floors, width)
        if fitted is None:
            _print_expanded(headers, cells, cut, title=title, out=out, width=width)
            return
        widths = fitted
        cells = [[_clip(text, widths[i]) for i, text in enumerate(row)] for row in cells]

    def line(values: Sequence[str]) -> str:
        parts = [_pad(v, widths[i], right=numeric[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    if title:
        print(_title(title), file=out)
    print(line(headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for row in cells:
        print(line(row), file=out)
    if not cells:
        print("(no rows)", file=out)


def _encodable(text: str, encoding: str) -> str:
    """``text`` with each character ``encoding`` cannot hold escaped (``\\u652f``)."""
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        pass
    return text


def _print_expanded(
    headers: Sequence[str],
    cells: Sequence[Sequence[str]],
    cut: Collection[str],
    *,
    title: str | None,
    out: IO[str],
    width: int,
) -> None:
    """Each row as a block of ``header  value`` lines (for a table wider than ``width``)."""
    label = max(display_width(h) for h in headers)
    room = max(_MIN_COLUMN, width - label - 2)
    if title:
        print(_title(title), file=out)
    for n, row in enumerate(cells, 1):
        print(f"-[ {n} ]".ljust(min(width, label + 2 + room), "-"), file=out)
        for h, text in zip(headers, row, strict=True):
            value = _clip(text, room) if h in cut else text
            print(f"{_pad(h, label, right=False)}  {value}".rstrip(), file=out)


def print_pairs(
    rows: Sequence[tuple[str, object]], *, title: str | None = None, file: IO[str] | None = None
) -> None:
    """Print ``label  value`` lines with the labels aligned (values escaped as in tables)."""
    out = file if file is not None else sys.stdout
    if title:
        print(_title(title), file=out)
    width = max((display_width(label) for label, _ in rows), default=0)
    for label, value in rows:
        print(f"  {_pad(label, width, right=False)}  {_cell(value)}".rstrip(), file=out)


def _looks_numeric(text: str) -> bool:
    stripped = text.strip().lstrip("$").rstrip("%").replace(",", "")
    for suffix in (" ms", "ms"):
        stripped = stripped.removesuffix(suffix)
    try:
        float(stripped)
    except ValueError:
        return text == "-"
    return True


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if hasattr(value, "value"):
        return value.value
    raise TypeError(f"cannot serialize {type(value).__name__}")


def emit_json(data: object, *, file: IO[str] | None = None) -> None:
    """Print ``data`` as indented JSON (datetimes as ISO strings, records via ``to_dict``)."""
    out = file if file is not None else sys.stdout
    json.dump(data, out, indent=2, default=_json_default)
    out.write("\n")


FIXED_BELOW = 1e9
"""
Numbers of this size or more (and infinities) print in the short scientific form of
``{:.4g}`` (``1e+300``, ``$1.798e+308``): a valid recorded cost or latency can be as
large as a float gets, and its 300 digits would push every other column off the screen.
Below it, each number prints in its column's fixed format.
"""


def _short(value: float) -> str | None:
    """``value`` in the short form when it is too large for a fixed format, else None."""
    return None if abs(value) < FIXED_BELOW else f"{value:.4g}"


_PCT_DIGITS = 4
"""The most decimals a percentage gets to stay off 0% or 100% (`fmt_pct`)."""

_PCT_NOISE = 1e-9
"""How close to 0% or 100% (in percent) a value is taken to be exactly that (float noise)."""


def fmt_pct(value: float | None) -> str:
    """
    ``value`` (a fraction) as a percentage with one decimal, or the fewest more (up to
    `_PCT_DIGITS`) that keep a value short of 100% from reading as 100.0% and one
    above 0% from reading as 0.0% (``99.95%``, ``0.03%``): a rate of 1999 in 2000 is
    not a perfect record.  Closer still, it is cut toward its side (``99.9999%``), or
    shown in short scientific form near 0 (``1e-07%``).
    """
    if value is None:
        return "-"
    pct = value * 100
    if (short := _short(pct)) is not None:
        return f"{short}%"
    for digits in range(1, _PCT_DIGITS + 1):
        text = f"{pct:.{digits}f}"
        shown = float(text)
        # (a bound computed as 1 - 2e-16 is 100%: only float noise lies between them)
        if shown not in (0.0, 100.0) or abs(shown - pct) <= _PCT_NOISE:
            return f"{text}%"
    if pct > 50:
        return f"{math.floor(pct * 10**_PCT_DIGITS) / 10**_PCT_DIGITS:.{_PCT_DIGITS}f}%"
    return f"{pct:.2g}%"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return _short(value) or f"{value:.1f}"


_USD_DIGITS = 12
"""The most decimals an amount under a cent gets (`fmt_usd`); smaller ones print short."""


def fmt_usd(value: float | None) -> str:
    """
    ``value`` in dollars: four decimals, six under a cent, and more for an amount too
    small for six (a cheap call's cost, ``$0.00000040``): at least two significant
    digits, so an amount that is not zero never reads as ``$0``.  Past `_USD_DIGITS`
    decimals, and from `FIXED_BELOW` on, the short scientific form (``$1e-15``).
    """
    if value is None:
        return "-"
    if (short := _short(value)) is not None:
        return f"${short}"
    if value and abs(value) < 0.01:
        digits = max(6, 1 - math.floor(math.log10(abs(value))))
        return f"${value:.{digits}f}" if digits <= _USD_DIGITS else f"${value:.2g}"
    return f"${value:,.4f}"


# --------------------------------------------------------------------------- progress


class Progress:
    """
    A one-line progress bar on stderr, drawn only when stderr is a terminal.

    ``with Progress(total, "calls") as bar: bar.advance(1)``; redraws at most ten
    times a second and clears the line on exit.  Never drawn beside an ``output``
    written to a terminal (the screen it would be drawn into).
    """

    def __init__(
        self,
        total: int,
        label: str,
        *,
        stream: IO[str] | None = None,
        output: IO[str] | None = None,
    ) -> None:
        self.total = max(0, total)
        self.label = label
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        beside = output is not None and _isatty(output)
        self._enabled = _isatty(self._stream) and self.total > 0 and not beside
        self._last_draw = 0.0
        self._drawn = False
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> Progress:
        if self._enabled:
            # a log line written to the bar's stream first clears the bar, so the two
            # never share a line; the bar is drawn again on the next advance
            self._handlers = [h for h in _log_handlers() if _writes_to(h, self._stream)]
            for handler in self._handlers:
                handler.addFilter(self._log_filter)
        self._draw(force=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for handler in self._handlers:
            handler.removeFilter(self._log_filter)
        self._handlers = []
        if self._enabled:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()

    def _log_filter(self, record: logging.LogRecord) -> bool:
        if self._drawn:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
            self._drawn = False
            self._last_draw = 0.0  # redraw on the next advance
        return True

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        self._draw(force=self.done == self.total or not self._drawn)

    def _draw(self, *, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        width = 30
        fraction = self.done / self.total if self.total else 1.0
        filled = math.floor(width * fraction)
        bar = "#" * filled + "." * (width - filled)
        self._stream.write(f"\r{self.label} [{bar}] {self.done}/{self.total}")
        self._stream.flush()
        self._drawn = True


def _log_handlers() -> list[logging.Handler]:
    """Every handler a log record may reach: all loggers' and the last-resort one."""
    found: list[logging.Handler] = list(logging.getLogger().handlers)
    for item in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(item, logging.Logger):
            found.extend(item.handlers)
    if logging.lastResort is not None:
        found.append(logging.lastResort)
    unique: dict[int, logging.Handler] = {id(h): h for h in found}
    return list(unique.values())


def _writes_to(handler: logging.Handler, stream: IO[str]) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream is stream


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def utf8(encoding: str | None) -> bool:
    """Whether a stream's ``encoding`` is UTF-8 (any spelling; None: unknown, taken as not)."""
    if encoding is None:
        return False
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


@contextlib.contextmanager
def utf8_output(out: IO[str]) -> Iterator[IO[str]]:
    """
    ``out`` writing UTF-8 while in the block, whatever its encoding (data, such as an
    export's records, keeps every character; a table is for `main`'s escaping), then
    given back its own.
    """
    encoding = getattr(out, "encoding", None)
    errors = getattr(out, "errors", None)
    reconfigure = getattr(out, "reconfigure", None)
    if reconfigure is None or utf8(encoding):
        yield out
        return
    reconfigure(encoding="utf-8", errors="strict")
    try:
        yield out
    finally:
        with contextlib.suppress(OSError, ValueError):  # a closed or full output
            reconfigure(encoding=encoding, errors=errors)


def stdin_is_terminal() -> bool:
    """True when a person can answer a prompt (stdin is a TTY)."""
    return _isatty(sys.stdin)


def ask(prompt: str) -> str | None:
    """
    Print ``prompt`` on stderr and read the answer's line from stdin; None at the end
    of the input (Ctrl-D).  Not on stdout: that holds the command's output (a
    ``--json`` document, a table sent to a file), which a question must not break.
    """
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = sys.stdin.readline()
    if not line:
        sys.stderr.write("\n")  # the next message on a line of its own
        return None
    return line.rstrip("\r\n")


# --------------------------------------------------------------------------- async


class _Interrupts:
    """
    Ctrl-C while `run_async` runs: each one cancels the task running the command, from
    the event loop (``call_soon_threadsafe``), never in the middle of it.

    asyncio's own handler raises KeyboardInterrupt at the second Ctrl-C wherever the
    main thread is: inside the loop's machinery that can drop a task's wake-up, and
    ``asyncio.run`` then waits for ever for that task; and it cancels every other task
    (a telemetry flusher in the middle of a batch) under the command's own close.  Here
    the first cancellation lets the command close what it opened (each close bounded),
    a further one cuts the close short (the exit flush writes the telemetry left).
    """

    def __init__(self) -> None:
        self.count = 0
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> bool:
        """Take over SIGINT, when it is at Python's default in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return False
        signal.signal(signal.SIGINT, self._on_sigint)
        return True

    def uninstall(self) -> None:
        """
        Give SIGINT back; after a Ctrl-C, ignored from now on: the process is ending,
        and one more must not cut its exit flush short or end it with a traceback.
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN if self.count else signal.default_int_handler)

    def attach(self) -> None:
        """In the task running the command: the one each Ctrl-C cancels."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        if self.count and self._task is not None:
            self._task.cancel()  # a Ctrl-C before the command started

    def detach(self) -> None:
        self._task = self._loop = None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        task, loop = self._task, self._loop
        if task is not None and loop is not None:
            loop.call_soon_threadsafe(task.cancel)


def run_async(fn: Callable[[], Awaitable[T]]) -> T:
    """
    Run ``fn()`` on a fresh asyncio event loop and return its result.

    Raises:
        KeyboardInterrupt: after a Ctrl-C (any number of them), once ``fn`` has ended.
    """
    interrupts = _Interrupts()

    async def body() -> T:
        interrupts.attach()
        try:
            return await fn()
        finally:
            interrupts.detach()

    if not interrupts.install():
        return anyio.run(body, backend="asyncio")
    try:
        result = anyio.run(body, backend="asyncio")
    except BaseException:
        if interrupts.count:
            raise KeyboardInterrupt from None
        raise
    finally:
        interrupts.uninstall()
    if interrupts.count:
        raise KeyboardInterrupt
    return result
