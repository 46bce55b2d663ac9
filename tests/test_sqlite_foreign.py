"""
Foreign SQLite files are left alone, and read-only CLI commands change nothing.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from pathlib import Path

import anyio.to_thread
import pytest

from empathy_models import LLMCallRecord, state_store_from_url, telemetry_from_url
from empathy_models.cli import main as cli_main
from empathy_models.exceptions import SchemaVersionError, StateStoreError, TelemetryError


def _foreign(path: Path, *, user_version: int = 0) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
        conn.execute(f"PRAGMA user_version = {user_version}")
    conn.close()
    path.chmod(0o644)  # as another application may share its file with its group
    return path


def _fingerprint(path: Path) -> tuple[str, list[str], int]:
    siblings = sorted(p.name for p in path.parent.iterdir())
    mode = stat.S_IMODE(path.stat().st_mode)
    return hashlib.sha256(path.read_bytes()).hexdigest(), siblings, mode


def _journal_mode(path: Path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0])
    finally:
        conn.close()


@pytest.mark.parametrize("user_version", [0, 1])
async def test_a_foreign_file_is_refused_and_left_untouched(
    tmp_path: Path, user_version: int
) -> None:
    db = _foreign(tmp_path / "app.db", user_version=user_version)
    before = _fingerprint(db)
    backend = telemetry_from_url(f"sqlite:///{db}")
    with pytest.raises(TelemetryError, match=r"belongs to another application.*invoices"):
        await backend.recent()
    await backend.aclose()
    store = state_store_from_url(f"sqlite:///{db}")
    with pytest.raises(StateStoreError, match=r"allow_foreign=True"):
        await store.snapshot("k")
    await store.aclose()
    assert _fingerprint(db) == before
    assert _journal_mode(db) == "delete"


@pytest.mark.parametrize(
    "command",
    [
        ["breaker", "reset", "--all"],
        ["breaker", "open", "openai"],
        ["budget", "reset", "global/day"],
        ["budget", "set", "global/day", "--limit", "5"],
    ],
)
async def test_write_commands_refuse_a_foreign_file_and_leave_it_untouched(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    db = _foreign(tmp_path / "app.db")
    before = _fingerprint(db)
    assert await anyio.to_thread.run_sync(cli_main, [*command, "--db", str(db)]) != 0
    assert "belongs to another application" in capsys.readouterr().err
    assert _fingerprint(db) == before  # its mode included
    assert _journal_mode(db) == "delete"


async def test_allow_foreign_adds_the_tables_when_asked(tmp_path: Path) -> None:
    db = _foreign(tmp_path / "app.db")
    async with telemetry_from_url(f"sqlite:///{db}?allow_foreign=true") as backend:
        await backend.record(LLMCallRecord(provider="p", model="m", outcome="success"))
        assert len(await backend.recent()) == 1
    assert stat.S_IMODE(db.stat().st_mode) == 0o600  # adopted: made private like ours
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT total FROM invoices").fetchone() == (12.5,)
    conn.close()


async def test_a_newer_schema_is_refused_before_any_change(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA user_version = 999")
    conn.close()
    before = _fingerprint(db)
    backend = telemetry_from_url(f"sqlite:///{db}")
    with pytest.raises(SchemaVersionError):
        await backend.recent()
    await backend.aclose()
    assert _fingerprint(db) == before and _journal_mode(db) == "delete"


@pytest.mark.parametrize(
    "command",
    [
        ["telemetry", "summary"],
        ["breaker", "status"],
        ["routing", "stats"],
    ],
)
async def test_read_only_commands_never_create_migrate_or_switch_a_file(
    tmp_path: Path, command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    before = _fingerprint(empty)
    assert await anyio.to_thread.run_sync(cli_main, [*command, "--db", str(empty)]) == 1
    assert "not an empathy-models database" in capsys.readouterr().err
    assert _fingerprint(empty) == before  # still 0 bytes, no -wal / -shm left behind

    # a real database made read-only for this user is still readable by these commands
    db = tmp_path / "real.db"
    async with telemetry_from_url(f"sqlite:///{db}") as backend:
        await backend.record(LLMCallRecord(provider="p", model="m", outcome="success"))
    async with state_store_from_url(f"sqlite:///{db}") as store:
        await store.reset("k")
    os.chmod(db, 0o400)
    content = _fingerprint(db)[0]
    assert await anyio.to_thread.run_sync(cli_main, [*command, "--db", str(db)]) == 0
    # the database is unchanged (SQLite may keep its WAL reader files next to it)
    assert _fingerprint(db)[0] == content
