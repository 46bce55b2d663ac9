"""
Backups of the auth strategy file: `reset_auth_strategy` moves the file into a
timestamped backup, `restore_auth_strategy` brings the newest (or a chosen) one back,
`list_auth_strategy_backups` lists them newest first.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from .._validators import check, failure, integer
from ..exceptions import AuthFileError, ConfigurationError
from ._files import (
    _atomic_write,
    _fsync_dir,
    _lexists,
    _locked,
    _read_regular,
    auth_strategy_file,
)
from .strategy import AuthStrategy

__all__ = [
    "DEFAULT_KEEP_BACKUPS",
    "list_auth_strategy_backups",
    "reset_auth_strategy",
    "restore_auth_strategy",
]

# <name>.<UTC timestamp>.<sequence number>.bak; earlier versions wrote
# <name>.<UTC timestamp>[-<counter>].bak (no sequence number: older than any that has one)
_BACKUP_RE: Final = re.compile(r"\.(\d{8}T\d{6}\d{6}Z)(?:-(\d+)|\.(\d+))?\.bak$")


_keep_backups = integer(failure(ConfigurationError), low=1, why="must be an integer >= 1")


def list_auth_strategy_backups(path: str | os.PathLike[str] | None = None) -> list[Path]:
    """
    Backups of the auth strategy file at ``path`` (default `auth_strategy_file`).

    Backups sit next to the file as ``<name>.<UTC timestamp>.<sequence number>.bak``
    (for example ``auth_strategy.json.20260101T120000123456Z.7.bak``).  The sequence
    number orders them, one more for each new backup, so a clock set back does not
    change which is newest; backups named by earlier versions (no sequence number) are
    older than any that has one, and ordered by their timestamp.

    Returns:
        Their paths, newest first.
    """
    file = Path(path) if path is not None else auth_strategy_file()
    return [entry for _, entry in _backups(file)]


def _backups(file: Path) -> list[tuple[tuple[int, str, int], Path]]:
    """The backups of ``file`` with their order (sequence, timestamp, counter), newest first."""
    if not file.parent.is_dir():
        return []
    found: list[tuple[tuple[int, str, int], Path]] = []
    prefix = file.name
    for entry in file.parent.iterdir():
        if not entry.name.startswith(prefix + "."):
            continue
        match = _BACKUP_RE.fullmatch(entry.name[len(prefix) :])
        if match and entry.is_file():
            order = (int(match.group(3) or 0), match.group(1), int(match.group(2) or 0))
            found.append((order, entry))
    found.sort(reverse=True)
    return found


DEFAULT_KEEP_BACKUPS: Final = 20
"""How many backups of the auth strategy file `reset_auth_strategy` keeps by default."""


def _backup_names(file: Path) -> Iterator[Path]:
    """
    Names for a new backup of ``file``, to try in turn: the sequence number one more
    than the newest backup's, then the next ones (called with the lock held).
    """
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    found = _backups(file)
    newest = found[0][0][0] if found else 0
    for number in itertools.count(newest + 1):
        yield file.with_name(f"{file.name}.{stamp}.{number}.bak")


def _backup_target(file: Path) -> Path:
    """A backup name for ``file`` that does not exist yet (called with the lock held)."""
    return next(t for t in _backup_names(file) if not (t.exists() or t.is_symlink()))


def _prune_backups(file: Path, keep: int, *, spare: Path | None = None) -> None:
    """Delete all but the ``keep`` newest backups of ``file``, and never ``spare``."""
    for old in list_auth_strategy_backups(file)[keep:]:
        if spare is None or not _same_file(old, spare):
            old.unlink(missing_ok=True)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _backup(file: Path) -> Path:
    try:
        data = _read_regular(file)
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot back up ({exc.strerror})", path=file) from exc
    for target in _backup_names(file):
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise AuthFileError(
                f"{target}: cannot create the backup ({exc.strerror})", path=target
            ) from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(target, 0o600)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise AuthFileError(f"{file}: cannot back up ({exc.strerror})", path=file) from exc
    _fsync_dir(file.parent)
    return target


def reset_auth_strategy(
    path: str | os.PathLike[str] | None = None, *, keep_backups: int = DEFAULT_KEEP_BACKUPS
) -> Path | None:
    """
    Move the auth strategy file into a backup; return the backup's path.

    The file is renamed (atomically) to a 0600 backup named as in
    `list_auth_strategy_backups`, under the same lock as `AuthStrategy.save`, so a save
    running at the same time lands either before the reset (and is in the backup) or
    after it (and is the new file): it is never lost.  A corrupt file is backed up as it
    is.  When the file is a symlink, its target is never changed (nor its mode): the
    content is copied into a regular 0600 backup and the link itself is removed.
    Blocking.

    Args:
        path: the file (default `auth_strategy_file`).
        keep_backups: only this many newest backups are kept (default 20); older ones
            are deleted.

    Returns:
        The backup's path, or None, touching nothing, when there is no file.

    Raises:
        AuthFileError: the file cannot be moved (it is then left in place), or it is a
            symlink to a missing file.
    """
    keep_backups = check(_keep_backups, "keep_backups", keep_backups)
    file = Path(path) if path is not None else auth_strategy_file()
    if not _lexists(file):
        return None
    if file.is_dir():
        raise AuthFileError(f"{file}: is a directory, not an auth strategy file", path=file)
    with _locked(file):
        if not _lexists(file):
            return None
        backup = _move_to_backup(file)
        _fsync_dir(file.parent)
        _prune_backups(file, keep_backups)
    return backup


def _move_to_backup(file: Path) -> Path | None:
    """
    Rename the file ``file`` to a 0600 backup; a symlink is copied instead (its target is
    read, never changed) and the link removed.  The mode is set through a descriptor
    opened with ``O_NOFOLLOW``, or by name for a file this user cannot open (mode 000),
    which ``lstat`` has just shown is not a link.  Called with the lock held.
    """
    if file.is_symlink():
        return _copy_link_to_backup(file)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except PermissionError:
        fd = None
    except FileNotFoundError:
        return None
    except OSError as exc:
        if file.is_symlink():  # replaced by a link since the check above
            return _copy_link_to_backup(file)
        raise AuthFileError(f"{file}: cannot open ({exc.strerror})", path=file) from exc
    try:
        mode = (os.fstat(fd) if fd is not None else os.lstat(file)).st_mode
        if not stat.S_ISREG(mode):
            raise AuthFileError(
                f"{file}: not a regular file (a FIFO, a socket or a device); nothing to "
                "back up (remove it)",
                path=file,
            )
        if fd is not None:
            os.fchmod(fd, 0o600)
        else:
            os.chmod(file, 0o600)
        backup = _backup_target(file)
        os.rename(file, backup)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthFileError(f"{file}: cannot move to a backup ({exc.strerror})", path=file) from exc
    finally:
        if fd is not None:
            os.close(fd)
    return backup


def _copy_link_to_backup(file: Path) -> Path:
    if not file.exists():
        raise AuthFileError(
            f"{file}: is a symlink to a missing file; nothing to back up (remove the link)",
            path=file,
        )
    backup = _backup(file)
    try:
        os.unlink(file)
    except FileNotFoundError:
        pass
    except OSError as exc:
        backup.unlink(missing_ok=True)
        raise AuthFileError(f"{file}: cannot remove the link ({exc.strerror})", path=file) from exc
    return backup


def restore_auth_strategy(
    path: str | os.PathLike[str] | None = None,
    *,
    backup: str | os.PathLike[str] | None = None,
    keep_backups: int = DEFAULT_KEEP_BACKUPS,
) -> tuple[Path, Path | None]:
    """
    Bring back the newest backup (or ``backup``) of the auth strategy file at ``path``.

    When a file is already in place it is itself backed up first, so a restore never
    loses data.  The backup is copied atomically (0600) and left in place.  It is chosen
    and read under the lock `reset_auth_strategy` takes, so a reset pruning backups at
    the same time cannot remove it halfway.  Backups are then pruned as by a reset,
    never the one restored.  Blocking.

    Args:
        path: the file (default `auth_strategy_file`).
        backup: the backup to restore (default: the newest).
        keep_backups: only this many newest backups are kept (default 20), besides the
            one restored; older ones are deleted.

    Returns:
        ``(restored_from, previous_file_backup_or_None)``.

    Raises:
        AuthFileError: there is no backup, or it does not hold a valid strategy (naming
            it).
    """
    keep_backups = check(_keep_backups, "keep_backups", keep_backups)
    file = Path(path) if path is not None else auth_strategy_file()
    # checked before the lock too, so that nothing (the directory) is created for a
    # restore that cannot happen; the newest backup only when there is no directory
    # (a listing made while a reset renames and prunes backups can see none of them),
    # after a look-up of the file that names a part of its path that is not a directory
    if backup is not None:
        _backup_content(Path(backup))
    elif not file.parent.is_dir():
        _lexists(file)
        _newest_backup(file)
    with _locked(file):
        # chosen and read under the lock, where a reset cannot prune it
        source = Path(backup) if backup is not None else _newest_backup(file)
        data = _backup_content(source)
        previous = _backup(file) if file.exists() else None
        _atomic_write(file, data)
        _prune_backups(file, keep_backups, spare=source)
    return source, previous


def _newest_backup(file: Path) -> Path:
    backups = list_auth_strategy_backups(file)
    if not backups:
        raise AuthFileError(
            f"{file}: no backup to restore (looked for {file.name}.*.bak)", path=file
        )
    return backups[0]


def _backup_content(source: Path) -> bytes:
    """The bytes of the backup ``source``, checked to hold a valid strategy."""
    if AuthStrategy.load_existing(source) is None:
        raise AuthFileError(f"{source}: backup not found", path=source)
    try:
        return _read_regular(source)
    except FileNotFoundError as exc:
        raise AuthFileError(f"{source}: backup not found", path=source) from exc
    except OSError as exc:
        raise AuthFileError(f"{source}: cannot read ({exc.strerror})", path=source) from exc
