"""
The auth strategy file on disk: its path, reading it, atomic 0600 writes in a 0700
directory, and the lock that saves, resets and restores share.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from .._paths import empathy_home, make_private_dirs
from ..exceptions import AuthFileError, ConfigurationError

__all__ = ["auth_strategy_file"]


def auth_strategy_file() -> Path:
    """
    The auth strategy file, ``$EMPATHY_HOME/auth_strategy.json``, resolved at call time.

    Raises:
        ConfigurationError: ``$EMPATHY_HOME`` (or ``~``) names a home directory that
            does not exist (an unknown ``~user``).
    """
    return empathy_home() / "auth_strategy.json"


# --------------------------------------------------------------------------- file helpers


def _reset_hint(file: Path) -> str:
    """
    The command that moves ``file`` away, keeping a backup, quoted for the messages:
    ``--file`` names ``file`` unless it is the default one (`auth_strategy_file`).
    """
    command = "empathy-models auth reset --yes"
    try:
        default = os.path.abspath(file) == os.path.abspath(auth_strategy_file())
    except (ConfigurationError, ValueError):  # no home directory, a NUL byte in the path
        default = False
    if not default:
        command += f" --file {shlex.quote(str(file))}"
    return f"`{command}` keeps a backup"


def _corrupt(file: Path, why: str) -> AuthFileError:
    """The error for a corrupt ``file``, saying ``why`` and how to move it away."""
    return AuthFileError(
        f"{file}: corrupt auth strategy file ({why}); fix it, or move it away "
        f"({_reset_hint(file)})",
        path=file,
    )


def _not_a_directory(directory: Path) -> Path | None:
    """
    The first of ``directory`` and its parents that exists as something other than a
    directory (a regular file, say), looking up to the first directory; None if none.
    """
    for path in (directory, *directory.parents):
        if path.is_dir():
            return None
        if os.path.lexists(path):
            return path
    return None


def _lexists(file: Path) -> bool:
    """
    Whether ``file`` exists (a symlink counts, even a dangling one); `AuthFileError` for a
    path the system cannot look up (a NUL byte, a name over the length limit).
    """
    try:
        os.lstat(file)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        blocker = _not_a_directory(file.parent)
        if blocker is None:  # the path changed meanwhile
            return False
        raise AuthFileError(
            f"{file}: not a usable path ({blocker} is not a directory)", path=file
        ) from None
    except ValueError as exc:  # "embedded null byte"
        raise AuthFileError(
            f"{str(file)!r}: not a usable auth strategy path (it contains a NUL byte)", path=file
        ) from exc
    except OSError as exc:
        raise AuthFileError(f"{file}: not a usable path ({exc.strerror})", path=file) from exc
    return True


def _read_regular(file: Path) -> bytes:
    """
    The bytes of ``file``, following a symlink; `AuthFileError` when it is a directory
    or not a regular file (a FIFO or a device, which a read could wait on forever).  It
    is opened without blocking and checked through the descriptor, so a FIFO put in its
    place meanwhile is refused too.  Other failures are `OSError`.
    """
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        stream = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with stream:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise AuthFileError(f"{file}: is a directory, not an auth strategy file", path=file)
        if not stat.S_ISREG(mode):
            raise AuthFileError(
                f"{file}: not a regular file (a FIFO, a socket or a device); the auth "
                "strategy file must be a regular file",
                path=file,
            )
        return stream.read()


def _read_json(file: Path) -> Any:
    """
    Parsed JSON of ``file`` (UTF-8, with or without a byte order mark); None if it does
    not exist; `AuthFileError` otherwise, including for a file that holds JSON ``null``
    (it is corrupt, not missing).
    """
    if not _lexists(file):
        return None
    try:
        raw = _read_regular(file)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot read ({exc.strerror})", path=file) from exc
    try:
        # a byte order mark (Windows Notepad writes one) is not part of the JSON
        data = json.loads(raw.decode("utf-8-sig"))
    except RecursionError as exc:
        raise _corrupt(file, "JSON nested too deeply") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = (
            f"line {exc.lineno} column {exc.colno}"
            if isinstance(exc, json.JSONDecodeError)
            else f"byte {exc.start}"
        )
        raise _corrupt(file, f"not valid UTF-8 JSON at {where}") from exc
    except ValueError as exc:  # an integer past Python's digit limit
        raise _corrupt(file, "a number too long to read") from exc
    if data is None:
        raise _corrupt(file, "it holds JSON null, not an object")
    return data


def _ensure_private_dir(directory: Path) -> None:
    if directory.is_dir():
        return
    try:
        make_private_dirs(directory)
        os.chmod(directory, 0o700)
    except OSError as exc:
        blocker = _not_a_directory(directory)
        why = exc.strerror if blocker is None else f"{blocker} is not a directory"
        raise AuthFileError(
            f"{directory}: cannot create the directory ({why})", path=directory
        ) from exc


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# a temporary file of `_atomic_write` (``tempfile.mkstemp``'s 8 random characters) left
# this long is one whose process died before the rename: every write holds the lock
_STALE_TEMP_SECONDS: Final = 15 * 60


def _remove_stale_temp_files(file: Path) -> None:
    """
    Delete the temporary files `_atomic_write` made for ``file`` that were left behind
    (their process killed before the rename), regular files older than
    `_STALE_TEMP_SECONDS` only.  Called with the lock held; failures are ignored.
    """
    pattern = re.compile(rf"\.{re.escape(file.name)}\.[a-z0-9_]{{8}}\.tmp")
    cutoff = time.time() - _STALE_TEMP_SECONDS
    try:
        entries = list(os.scandir(file.parent))
    except OSError:
        return
    for entry in entries:
        if not pattern.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and info.st_mtime < cutoff:
                os.unlink(entry.path)
        except OSError:
            continue


def _atomic_write(file: Path, data: bytes) -> None:
    """
    Write ``data`` to ``file`` atomically (a temporary file renamed over it), 0600.  A
    symlink (a file kept in a dotfiles repository, say) is written through: its
    target is replaced, in the target's directory, and the link kept.
    """
    if file.is_symlink():
        file = Path(os.path.realpath(file))
    directory = file.parent
    _ensure_private_dir(directory)
    _remove_stale_temp_files(file)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{file.name}.", suffix=".tmp")
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot write ({exc.strerror})", path=file) from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, file)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise AuthFileError(f"{file}: cannot write ({exc.strerror})", path=file) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    """
    Hold an exclusive lock (``flock``) on the directory of ``file``, shared by every
    process, so a save, a reset and a restore never interleave.  Where ``fcntl`` does
    not exist (Windows) the operations run unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    directory = file.parent
    _ensure_private_dir(directory)
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise AuthFileError(
            f"{directory}: cannot open the directory to lock it ({exc.strerror})", path=file
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
