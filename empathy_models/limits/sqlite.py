"""
`SQLiteQuotaStore`: budgets and rate limits in a SQLite file shared by every process
on a host.

It uses the same file format and rules as `empathy_models.backends.sqlite` (0600
file, WAL, busy retries, cancellation safety) and may share a file with the
telemetry backend and the circuit-state store: its one table, ``quota``, is created
on first use.  Each operation is one ``BEGIN IMMEDIATE`` transaction that reads the
key's row, applies the pure step of `empathy_models.limits.meter` with the UTC wall
clock read after the write lock is held, and writes the row back.  A budget's window
is dropped a week (`WINDOW_RETENTION`) after it ended, as in the other stores, checked
once an hour in each process (the time: `values.sweep_time`).
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Final, TypeVar

import aiosqlite

from ..abc import TransactionalQuotaStore
from ..backends.sqlite._conn import _fetchone
from ..backends.sqlite._database import MEMORY, _store_database
from ..backends.sqlite._url import _COMMON_OPTIONS, parse_sqlite_url
from ..exceptions import StateStoreError
from .values import WINDOW_RETENTION, sweep_time

__all__ = ["SQLiteQuotaStore"]

T = TypeVar("T")

_CREATE: Final = (
    "CREATE TABLE IF NOT EXISTS quota ("
    " key TEXT PRIMARY KEY, data TEXT NOT NULL, updated_at REAL NOT NULL) WITHOUT ROWID"
)


class SQLiteQuotaStore(TransactionalQuotaStore):
    """
    Quotas in a SQLite file (or ``":memory:"``), shared by every process that opens it.

    Args:
        path: the file, or ``":memory:"``.
        clock: UTC epoch seconds, read with the write lock held; times the rate limits.
        busy_timeout, lock_timeout, allow_foreign: as for `SQLiteStateStore`.
        read_only: as for `SQLiteStateStore`; a file without the quota table reads as
            empty.

    Raises:
        StateStoreError: naming the path, when the file cannot be used.
    """

    shared = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        lock_timeout: float = 30.0,
        read_only: bool = False,
        allow_foreign: bool = False,
    ) -> None:
        self._db = _store_database(
            path,
            clock,
            busy_timeout=busy_timeout,
            lock_timeout=lock_timeout,
            read_only=read_only,
            allow_foreign=allow_foreign,
        )
        self._clock = clock
        self._path = self._db.path
        if self._path == MEMORY:
            self.shared = False  # type: ignore[misc]
        self._ready = False
        self._missing = False  # read-only and the file has no quota table: reads are empty
        self._sweep_at = -math.inf  # the window start from which ended windows are dropped

    def __repr__(self) -> str:
        return f"SQLiteQuotaStore({self._path!r})"

    @property
    def path(self) -> str:
        return self._path

    async def _prepare(self, conn: aiosqlite.Connection) -> None:
        if not self._ready and self._db.read_only:
            row = await _fetchone(
                conn, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quota'"
            )
            self._missing = row is None
            self._ready = True
        if not self._ready:

            async def create(c: aiosqlite.Connection) -> None:
                await c.execute(_CREATE)

            await self._db.transaction(conn, create)
            self._ready = True

    async def _aopen(self) -> None:
        await self._db.run(self._prepare)

    def _decode(self, key: str, raw: object) -> dict[str, Any]:
        try:
            if not isinstance(raw, str):
                raise TypeError(f"expected JSON text, got {type(raw).__name__}")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("expected a JSON object")
        except (ValueError, TypeError) as exc:
            raise StateStoreError(
                f"SQLite database {self._path}: the quota {key!r} is unreadable ({exc})",
                target=self._path,
            ) from exc
        return data

    async def _transact(
        self, key: str, fn: Callable[[dict[str, Any] | None, float], tuple[Any, T]]
    ) -> T:
        db = self._db
        clock = self._clock

        async def body(conn: aiosqlite.Connection) -> T:
            row = await _fetchone(conn, "SELECT data FROM quota WHERE key = ?", (key,))
            current = None if row is None else self._decode(key, row[0])
            now = clock()
            new, result = fn(current, now)
            if new is not None:
                await conn.execute(
                    "INSERT INTO quota (key, data, updated_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET data = excluded.data, "
                    "updated_at = excluded.updated_at",
                    (key, json.dumps(new, separators=(",", ":")), time.time()),
                )
                if key.startswith("b|") and sweep_time(new, now) >= self._sweep_at:
                    await self._sweep(conn, sweep_time(new, now))
            return result

        async def job(conn: aiosqlite.Connection) -> T:
            await self._prepare(conn)
            return await db.transaction(conn, body)

        return await db.run(job)

    async def _sweep(self, conn: aiosqlite.Connection, newest: float) -> None:
        # drop the budget windows that ended a week before ``newest`` (`sweep_time`), as
        # `MemoryQuotaStore` does (one scan of the table an hour of it per process)
        await conn.execute(
            "DELETE FROM quota WHERE substr(key, 1, 2) = 'b|' "
            "AND json_extract(data, '$.window_end') < ?",
            (newest - WINDOW_RETENTION,),
        )
        self._sweep_at = newest + 3600.0

    def _now(self) -> float:
        return self._clock()

    async def _load(self, key: str) -> dict[str, Any] | None:
        async def job(conn: aiosqlite.Connection) -> sqlite3.Row | None:
            await self._prepare(conn)
            if self._missing:
                return None
            return await self._db.retrying(
                partial(_fetchone, conn, "SELECT data FROM quota WHERE key = ?", (key,))
            )

        row = await self._db.run(job)
        return None if row is None else self._decode(key, row[0])

    async def _scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            await self._prepare(conn)
            if self._missing:
                return []
            return await self._db.retrying(
                partial(
                    conn.execute_fetchall,
                    "SELECT key, data FROM quota WHERE substr(key, 1, ?) = ? ORDER BY key",
                    (len(prefix), prefix),
                )
            )

        return [(str(r[0]), self._decode(str(r[0]), r[1])) for r in await self._db.run(job)]

    async def _delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return

        async def body(conn: aiosqlite.Connection) -> None:
            await conn.executemany("DELETE FROM quota WHERE key = ?", [(k,) for k in keys])

        async def job(conn: aiosqlite.Connection) -> None:
            await self._prepare(conn)
            await self._db.transaction(conn, body)

        await self._db.run(job)

    async def _aclose(self) -> None:
        await self._db.close()


def quota_store(url: str, **options: Any) -> SQLiteQuotaStore:
    """``sqlite:///path.db`` as a `SQLiteQuotaStore` (options as for the state store)."""
    path, query = parse_sqlite_url(url, _COMMON_OPTIONS)
    return SQLiteQuotaStore(path, **{**query, **options})
