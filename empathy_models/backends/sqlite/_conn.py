"""
Statement-level helpers every SQLite module shares: one row of a query, a busy lock
recognised, a rollback that never masks the error being handled.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
import anyio

logger = logging.getLogger("empathy_models.backends.sqlite")


def _is_busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    text = str(exc).lower()
    return "locked" in text or "busy" in text


class _Busy(Exception):
    """The database stayed locked for longer than ``lock_timeout``."""


async def _fetchone(
    conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()
) -> sqlite3.Row | None:
    """The first row of a query's result, or None (one hop to the connection's thread)."""
    return next(iter(await conn.execute_fetchall(sql, params)), None)


async def _execute(conn: aiosqlite.Connection, sql: str, params: Sequence[Any] = ()) -> int:
    """
    Run one statement (in its own transaction, outside any other) and return the rows
    it changed.  Shielded from anyio cancellation like `_Database.transaction`'s
    attempts: a cancelled caller waits for the statement (at most ``busy_timeout``).
    """
    with anyio.CancelScope(shield=True):
        cursor = await conn.execute(sql, params)
    return cursor.rowcount


async def _nothing(conn: aiosqlite.Connection) -> None:
    """An operation that only opens the connection."""


async def _rollback(conn: aiosqlite.Connection) -> None:
    """
    Queue a rollback behind every statement already sent on ``conn`` and await it.

    ``Connection.rollback`` does nothing outside a transaction, so this is safe after
    any failure.  The rollback is queued before the first suspension: if this await
    is itself cancelled, the rollback still runs on the connection's thread before
    any statement sent later.
    """
    try:
        await conn.rollback()
    except (sqlite3.Error, ValueError):  # the transaction or the connection is gone
        logger.debug("rollback failed", exc_info=True)
