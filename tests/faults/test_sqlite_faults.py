"""
SQLite under faults: the disk full for seconds (in a process of its own:
``RLIMIT_FSIZE``), the file deleted while in use, its header overwritten for a while.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.evidence import rollup
from empathy_models.exceptions import TelemetryError
from empathy_models.testing.contracts import assert_same_buckets

from .._workers import Child
from ._load import WORKER, record, sqlite_rows
from ._worker import DISK_FULL_SECONDS


@pytest.mark.slow
def test_a_full_disk_for_seconds_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "calls.db"
    child = Child(WORKER, "diskfull", "sqlite", str(db), "3000")
    try:
        report = child.read(timeout=120)
        child.finish()
    finally:
        child.close()
    stored = sqlite_rows(db)
    print(
        f"\nSQLite disk full {DISK_FULL_SECONDS:g} s: {report['produced']} records accepted, "
        f"{stored} stored, {report['spooled']} went through the spool; "
        f"longest record() {report['worst_ms']} ms"
    )
    assert (report["failed"], report["dropped"]) == (0, 0)
    assert report["spooled"] > 0, "the writes failed long enough to outgrow the memory budget"
    assert stored == report["produced"]


async def test_a_deleted_file_is_recreated_with_everything_it_held(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many([record("before", i) for i in range(1000)])
        await backend.flush()
        os.unlink(db)  # what `rm calls.db` does while the program runs
        with caplog.at_level(logging.WARNING):
            await backend.record_many([record("after", i) for i in range(1000)])
            await backend.flush()
        assert backend.recreated == 1 and backend.failed == 0
        assert len(await backend.recent(limit=5000)) == 2000
        written = [record("before", i) for i in range(1000)]
        written += [record("after", i) for i in range(1000)]
        assert_same_buckets((await backend.evidence()).buckets, rollup(written), "rescued")
    stored = sqlite_rows(db)
    print(f"\nSQLite file deleted while open: 2000 written (1000 before), {stored} stored")
    assert db.exists() and (db.stat().st_mode & 0o777) == 0o600
    assert stored == 2000
    assert not [n for n in os.listdir(tmp_path) if ".rescued-" in n], "the copy is removed"
    assert any(
        "was deleted while open; recreated it with the 1000 calls" in r.getMessage()
        for r in caplog.records
    )


async def test_a_deleted_file_whose_path_is_taken_for_a_while_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the open connection is the only copy of what the deleted file held: it is kept
    # until a new file could be made at the path, and that copy merged into it
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db) as backend:
        await backend.record_many([record("before", i) for i in range(1000)])
        await backend.flush()
        for suffix in ("", "-wal", "-shm"):
            os.unlink(f"{db}{suffix}")
        db.mkdir()  # the path cannot be recreated for now
        await backend.record_many([record("during", i) for i in range(500)])
        await backend.flush()
        assert backend.recreated == 0 and backend.pending == 500
        db.rmdir()
        with caplog.at_level(logging.WARNING):
            await backend.record_many([record("after", i) for i in range(500)])
            await backend.flush()
        assert backend.recreated == 1 and backend.failed == 0 and backend.pending == 0
    assert sqlite_rows(db) == 2000
    assert not [n for n in os.listdir(tmp_path) if ".rescued-" in n], "the copy is removed"
    assert any(
        "was deleted while open; recreated it with the 1000 calls" in r.getMessage()
        for r in caplog.records
    )


_SWAP_HEADER = """
import sys
with open(sys.argv[1], "r+b") as f:
    old = f.read(100)
    f.seek(0)
    f.write(bytes.fromhex(sys.argv[2]) if len(sys.argv) > 2 else bytes(100))
print(old.hex())
"""


def _swap_header(db: Path, header: str | None = None) -> str:
    """Overwrite the file's 100-byte header (zeros, or ``header`` in hex) from another
    process (closing a descriptor of the file here would drop this process's SQLite
    locks); the header it held, in hex."""
    argv = [sys.executable, "-c", _SWAP_HEADER, str(db), *([header] if header else [])]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


async def test_a_header_overwritten_for_a_while_stops_writes_only_while_it_is(
    tmp_path: Path,
) -> None:
    # once SQLite found the file "not a database", that connection kept saying so after
    # the header was back: only a new connection reads it again
    db = tmp_path / "calls.db"
    async with SQLiteTelemetryBackend(db, batch=False) as backend:
        await backend.record_many([record("before", i) for i in range(10)])
        checkpoint = sqlite3.connect(db)  # the header is read from the file, not the WAL
        checkpoint.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        checkpoint.close()
        header = _swap_header(db)
        with pytest.raises(TelemetryError, match="not a SQLite database"):
            await backend.record_many([record("during", i) for i in range(10)])
        _swap_header(db, header)
        await backend.record_many([record("after", i) for i in range(10)])
    assert sqlite_rows(db) == 20
