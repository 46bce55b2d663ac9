"""
The local spool: records a telemetry store could not take yet, kept on disk.

Each store has its own directory, ``$EMPATHY_HOME/spool/<digest of the store>``
(mode 0700, as is each parent the spool creates), so records are only ever replayed
into the store they were meant for.
Every spill is one new file of JSON lines (the versioned dicts of
`empathy_models.serialization`, records as given: the store decides what it takes,
as it does on the write path), written to a temporary name, flushed to disk and
renamed, so a file is either complete or absent; files are mode 0600.  A temporary
file its writer left (the process killed before the rename) is taken up by the next
listing (`Spool.files`) once its writer is gone: renamed to the name it was to have
and replayed (a line cut short counted unreadable), or deleted when it was the rewrite
of a claimed file, which still holds every record.  The writer holds a ``flock`` on
the temporary file until it is renamed (where ``fcntl`` exists), so a writer this
process cannot see (another PID namespace) keeps its file.  Replaying
claims a file by renaming it (two processes, or two replays in one process, never
replay the same file at once),
writes its records and deletes it; one that fails partway gives the file back
holding only the records it did not write.  Records the store failed on alone (see
`empathy_models.backends._batch_writer`) go to files of their own, named ``held-...``,
which are replayed after every other file, so they cannot hold those up.  Replay is
idempotent: the stores ignore a record whose ``call_id`` they already hold, so a file
replayed twice after a crash stores nothing twice.  Everything here is synchronous;
the batching engine runs it on a worker thread, or directly at interpreter exit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

from .._paths import make_private_dirs
from ..exceptions import RecordValidationError
from ..records import LLMCallRecord
from ..serialization import to_dict
from ._storable import storable, stored_record

__all__ = ["Spool"]

logger = logging.getLogger("empathy_models.telemetry")

_SUFFIX: Final = ".jsonl"
_CLAIMED: Final = ".claimed-"
_HELD: Final = "held-"  # sorts after the other files, named by a time in digits
_TMP: Final = ".tmp"

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    _flock = None
else:
    _flock = fcntl.flock

_writing: set[str] = set()
"""The temporary files this process is writing (the spill's thread), by name."""

_replaying: set[str] = set()
"""The claimed files a replay in this process is at (`Spool.claim` to `Spool.done`), by path."""
_replaying_lock = threading.Lock()


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a claim of ours no replay is at was abandoned by an interrupted one
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _line(record: LLMCallRecord) -> str:
    """
    ``record`` as a spool line: as given (JSON escapes a NUL or a lone surrogate, which
    read back as they were, and the store decides whether it takes them), or made
    storable when JSON cannot hold it (a metadata integer past 4,300 digits).
    """
    try:
        return json.dumps(to_dict(record), separators=(",", ":"))
    except ValueError:
        safe, _ = storable(record)
        return json.dumps(to_dict(safe), separators=(",", ":"))


class Spool:
    """
    The spool directory of one store, named by ``target`` (a description without secrets).

    The directory is resolved from ``$EMPATHY_HOME`` when first used.  ``former``: the
    targets earlier versions named the store by, whose directories' files are listed
    (and so replayed) with this one's; each is removed once it holds nothing.
    """

    def __init__(self, target: str, former: Sequence[str] = ()) -> None:
        self.target = target
        self._digest = hashlib.sha256(target.encode("utf-8", "backslashreplace")).hexdigest()[:24]
        self._directory: Path | None = None
        self._former = tuple(Spool(name) for name in dict.fromkeys(former) if name != target)

    def __repr__(self) -> str:
        return f"Spool({self.target!r})"

    @property
    def directory(self) -> Path:
        """``$EMPATHY_HOME/spool/<digest>``, resolved on first use."""
        if self._directory is None:
            from .._paths import empathy_home

            self._directory = empathy_home() / "spool" / self._digest
        return self._directory

    def write(self, records: Iterable[LLMCallRecord], *, held: bool = False) -> int:
        """
        Write ``records`` to a new spool file; return how many were written.  ``held``:
        records the store failed on alone, in a file replayed after the others (and
        after the files of records held before).
        """
        directory = self.directory
        name = f"{_HELD if held else ''}{time.time_ns():020d}-{os.getpid()}-{secrets.token_hex(4)}"
        return self._write(records, directory / f"{name}{_SUFFIX}")

    @staticmethod
    def is_held(path: Path) -> bool:
        """Whether ``path`` (claimed or not) holds records written with ``held``."""
        return path.name.startswith(_HELD)

    def give_back(self, claimed: Path, rest: list[LLMCallRecord]) -> None:
        """
        Give a claimed file back holding only ``rest``: the records its replay did not
        write (those it wrote, and lines it could not read, are not replayed again).
        """
        if rest:
            self._write(rest, claimed)
            self.release(claimed)
        else:
            self.remove(claimed)

    def _write(self, records: Iterable[LLMCallRecord], target: Path) -> int:
        """
        Write ``records`` as the file ``target`` (replaced at once); how many were.  The
        temporary file is locked until it is renamed (see `_left_behind`).
        """
        lines = [_line(record) for record in records]
        if not lines:
            return 0
        directory = self.directory
        make_private_dirs(directory)
        tmp = directory / f".{target.name}.{secrets.token_hex(4)}{_TMP}"
        _writing.add(tmp.name)
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600
            )
        except BaseException:
            _writing.discard(tmp.name)
            raise
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                if _flock is not None:
                    with contextlib.suppress(OSError):  # a file system without locks
                        _flock(out.fileno(), fcntl.LOCK_EX)
                out.write("\n".join(lines))
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
                os.replace(tmp, target)  # before the lock goes with the file's closing
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            _writing.discard(tmp.name)
        return len(lines)

    def _left_behind(self, name: str) -> str | None:
        """
        Take up the temporary file ``name`` if its writer ended before renaming it:
        rename it to the name it was to have, returned; or delete it, when it was the
        rewrite of a claimed file (`give_back`), which still holds every record.  Left
        as it is while its writer may still be writing it: this process writing it, the
        process the file names (the spill's, or the claim's) alive, or its lock held.
        """
        target = name[1:].removesuffix(_TMP).rpartition(".")[0]
        if _CLAIMED in target:
            pid = target.rsplit(_CLAIMED, 1)[1]
        elif target.endswith(_SUFFIX):  # [held-]<time>-<pid>-<hex>.jsonl
            parts = target.removesuffix(_SUFFIX).split("-")
            pid = parts[-2] if len(parts) > 2 else ""
        else:
            return None  # not the spool's
        if not pid.isdigit() or name in _writing or _alive(int(pid)):
            return None
        tmp = self.directory / name
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return None  # renamed by its writer, or taken up by another process
        try:
            if _flock is not None:
                try:
                    _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None  # still being written, by a process out of sight
                except OSError:
                    pass  # a file system without locks: its writer's process is gone
            if _CLAIMED in target:
                tmp.unlink(missing_ok=True)
                return None
            try:
                os.rename(tmp, self.directory / target)
            except FileNotFoundError:
                return None
        finally:
            os.close(fd)
        logger.warning(
            "telemetry spool %s: %s was left by a process that ended while writing it; "
            "its records are replayed",
            self.target,
            target,
        )
        return target

    def files(self) -> list[Path]:
        """
        Spool files waiting for replay, abandoned claims and the files of writers that
        ended before renaming them included, those of the ``former`` directories too:
        oldest first, the files of held records after the others.
        """
        found = self._files()
        for spool in self._former:
            older = spool._files()
            if not older:
                with contextlib.suppress(OSError):  # absent, or a file being written
                    os.rmdir(spool.directory)
            found.extend(older)
        return sorted(found, key=lambda path: (self.is_held(path), path.name))

    def _files(self) -> list[Path]:
        """`files` of this directory alone."""
        directory = self.directory
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        for name in list(names):
            if name.startswith(".") and name.endswith(_TMP):
                try:
                    found = self._left_behind(name)
                except OSError as exc:  # out of reach (its mode, say): the others go on
                    logger.warning(
                        "telemetry spool %s: cannot take up %s, left by a writer (%s: %s)",
                        self.target,
                        name,
                        type(exc).__name__,
                        exc.strerror or exc,
                    )
                    continue
                if found is not None:
                    names.append(found)
        out = []
        for name in sorted(names, key=lambda name: (name.startswith(_HELD), name)):
            if name.endswith(_SUFFIX):
                out.append(directory / name)
            elif _CLAIMED in name:
                pid = name.rsplit(_CLAIMED, 1)[1]
                path = directory / name
                if pid.isdigit() and not _alive(int(pid)) and str(path) not in _replaying:
                    out.append(path)
        return out

    def claim(self, path: Path) -> Path | None:
        """
        Rename ``path`` to a claim of this process; None when another process, or
        another replay in this one, took it.  Each claim is ended with `done`.
        """
        base = path.name.split(_CLAIMED, 1)[0]
        claimed = path.with_name(f"{base}{_CLAIMED}{os.getpid()}")
        with _replaying_lock:  # the claims are made on worker threads
            if str(claimed) in _replaying:
                return None
            _replaying.add(str(claimed))
        try:
            os.rename(path, claimed)
        except BaseException as exc:
            _replaying.discard(str(claimed))
            if isinstance(exc, FileNotFoundError):
                return None
            raise
        return claimed

    @staticmethod
    def done(claimed: Path) -> None:
        """
        The replay of ``claimed`` is over (the file removed, given back, or left under
        this process's claim for the next listing to take up).
        """
        _replaying.discard(str(claimed))

    def release(self, claimed: Path) -> None:
        """Give a claimed file back (its replay failed; it is replayed later)."""
        base = claimed.name.split(_CLAIMED, 1)[0]
        with contextlib.suppress(FileNotFoundError):
            os.rename(claimed, claimed.with_name(base))

    def read(self, claimed: Path) -> tuple[list[LLMCallRecord], int]:
        """
        The records of a claimed file and how many of its lines were unreadable (a tier
        or circuit state this version does not know reads as unknown: `stored_record`).
        """
        records: list[LLMCallRecord] = []
        bad = 0
        with open(claimed, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(stored_record(json.loads(line)))
                except (ValueError, RecordValidationError, RecursionError):  # nested too deep
                    bad += 1
        if bad:
            logger.warning(
                "telemetry spool %s: %d unreadable records skipped in %s",
                self.target,
                bad,
                claimed.name,
            )
        return records, bad

    def remove(self, claimed: Path) -> None:
        """Delete a file whose records are all stored (and its directory, if former and empty)."""
        claimed.unlink(missing_ok=True)
        if claimed.parent != self.directory:
            with contextlib.suppress(OSError):  # files left in it
                os.rmdir(claimed.parent)
