"""
The local spool: records a telemetry store could not take yet, kept on disk.

Each store has its own directory, ``$EMPATHY_HOME/spool/<digest of the store>``
(mode 0700, as is each parent the spool creates), so records are only ever replayed
into the store they were meant for.
Every spill is one new file of JSON lines (the versioned dicts of
`empathy_models.serialization`, records as given: the store decides what it takes,
as it does on the write path), written to a temporary name, flushed to disk and
renamed, so a file is either complete or absent; files are mode 0600.  Replaying
claims a file by renaming it (two processes never replay the same file at once),
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
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from .._paths import make_private_dirs
from ..exceptions import RecordValidationError
from ..records import LLMCallRecord
from ..serialization import from_dict, to_dict
from ._storable import storable

__all__ = ["Spool"]

logger = logging.getLogger("empathy_models.telemetry")

_SUFFIX: Final = ".jsonl"
_CLAIMED: Final = ".claimed-"
_HELD: Final = "held-"  # sorts after the other files, named by a time in digits


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a claim of ours still on disk was abandoned by an interrupted replay
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

    The directory is resolved from ``$EMPATHY_HOME`` when first used.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._digest = hashlib.sha256(target.encode("utf-8", "backslashreplace")).hexdigest()[:24]
        self._directory: Path | None = None

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
        """Write ``records`` as the file ``target`` (replaced at once); how many were."""
        lines = [_line(record) for record in records]
        if not lines:
            return 0
        directory = self.directory
        make_private_dirs(directory)
        tmp = directory / f".{target.name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                out.write("\n".join(lines))
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return len(lines)

    def files(self) -> list[Path]:
        """
        Spool files waiting for replay, abandoned claims included: oldest first, the
        files of held records after the others.
        """
        directory = self.directory
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return []
        out = []
        for name in sorted(names, key=lambda name: (name.startswith(_HELD), name)):
            if name.endswith(_SUFFIX):
                out.append(directory / name)
            elif _CLAIMED in name:
                pid = name.rsplit(_CLAIMED, 1)[1]
                if pid.isdigit() and not _alive(int(pid)):
                    out.append(directory / name)
        return out

    def claim(self, path: Path) -> Path | None:
        """Rename ``path`` to a claim of this process; None when another process took it."""
        base = path.name.split(_CLAIMED, 1)[0]
        claimed = path.with_name(f"{base}{_CLAIMED}{os.getpid()}")
        try:
            os.rename(path, claimed)
        except FileNotFoundError:
            return None
        return claimed

    def release(self, claimed: Path) -> None:
        """Give a claimed file back (its replay failed; it is replayed later)."""
        base = claimed.name.split(_CLAIMED, 1)[0]
        with contextlib.suppress(FileNotFoundError):
            os.rename(claimed, claimed.with_name(base))

    def read(self, claimed: Path) -> tuple[list[LLMCallRecord], int]:
        """The records of a claimed file and how many of its lines were unreadable."""
        records: list[LLMCallRecord] = []
        bad = 0
        with open(claimed, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    records.append(from_dict(json.loads(line), LLMCallRecord))
                except (ValueError, RecordValidationError):
                    bad += 1
        if bad:
            logger.warning(
                "telemetry spool %s: %d unreadable records skipped in %s",
                self.target,
                bad,
                claimed.name,
            )
        return records, bad

    @staticmethod
    def remove(claimed: Path) -> None:
        """Delete a file whose records are all stored."""
        claimed.unlink(missing_ok=True)
