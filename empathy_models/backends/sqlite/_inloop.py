"""
A second `sqlite3` connection to a backend's file, used in the event loop's thread for
single statements that never wait; anything else goes through aiosqlite's thread.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Sequence
from typing import Any, Final

import aiosqlite
import anyio
import anyio.to_thread

from ..._paths import quoted_path
from ._database import MEMORY, _Database

MISS: Final = object()
"""What `InLoop.fetchone` and `InLoop.write` return when the caller must use the thread."""

CHECKPOINT_EVERY: Final = 256
"""Every this many writes one goes through the thread's connection, which checkpoints."""


class InLoop:
    """
    A `sqlite3` connection used directly in the event loop's thread, next to the
    aiosqlite connection of a `_Database`.

    A statement through aiosqlite costs a hop to its thread and back (tens of µs); this
    connection runs one in the loop's thread when it cannot block: the file is in WAL
    mode (a read never waits for a writer), the busy timeout is zero (a write that
    finds the file locked fails at once), ``synchronous=NORMAL`` (a commit writes the
    WAL without an fsync) and ``wal_autocheckpoint=0`` (a commit never checkpoints).
    Every `CHECKPOINT_EVERY`-th write is left to the thread's connection, whose commit
    checkpoints when the WAL has grown past SQLite's default threshold.  Whenever the
    statement fails (a lock, any error) the caller gets `MISS` and runs it through the
    thread, where busy locks are waited for and retried and errors are mapped.

    It is opened (on a worker thread) after the aiosqlite connection, which creates,
    checks and migrates the file; not at all for ``:memory:`` (another connection
    would be another database) or a file that is not in WAL mode.  A read-only
    database is opened read-only and used for reads only.
    """

    def __init__(self, db: _Database) -> None:
        self._db = db
        self._conn: sqlite3.Connection | None = None
        self._settled = db.path == MEMORY  # opened, or never to be
        self._lock = threading.Lock()  # between `_settle` (a worker thread) and `close`
        self._writes = 0

    async def ready(self) -> None:
        """Open the connection on first use (and the aiosqlite one before it)."""
        if not self._settled:
            await self._db.run(self._open)

    async def _open(self, conn: aiosqlite.Connection) -> None:
        if not self._settled:  # else another caller opened it, or close() came first
            await anyio.to_thread.run_sync(self._settle)

    def _settle(self) -> None:
        """
        On a worker thread: connect and keep the connection, unless `close` came
        meanwhile (the connection is then closed here; a cancelled `_open` leaves it to
        this thread too).
        """
        made = self._connect()
        with self._lock:
            if self._settled:
                surplus = made
            else:
                self._conn, self._settled, surplus = made, True, None
        if surplus is not None:
            surplus.close()

    def _connect(self) -> sqlite3.Connection | None:
        db = self._db
        mode = "ro" if db.read_only else "rw"  # never creates a file: it exists by now
        target = f"file:{quoted_path(db.path)}?mode={mode}"
        try:
            conn = sqlite3.connect(
                target, uri=True, timeout=0.0, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("PRAGMA journal_mode").fetchall()
            if not row or str(row[0][0]).lower() != "wal":
                conn.close()
                return None
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except sqlite3.Error:
            conn.close()
            return None
        return conn

    def fetchone(self, sql: str, params: Sequence[Any]) -> Any:
        """The first row of a query (None if it has none), or `MISS`."""
        conn = self._conn
        if conn is None:
            return MISS
        try:
            # every row fetched: the statement is reset and its read transaction ends
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error:
            return MISS
        return rows[0] if rows else None

    def write(self, sql: str, params: Sequence[Any]) -> Any:
        """The number of rows one statement (its own transaction) changed, or `MISS`."""
        conn = self._conn
        if conn is None or self._db.read_only:
            return MISS
        self._writes += 1
        if self._writes % CHECKPOINT_EVERY == 0:
            return MISS
        try:
            return conn.execute(sql, params).rowcount
        except sqlite3.Error:
            return MISS

    async def close(self) -> None:
        """Close the connection (on a worker thread); it is never opened again."""
        with self._lock:
            self._settled = True
            conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(conn.close)
