"""
`SQLiteStateStore`: the breaker's state per key, read and written back conditionally
(one ``BEGIN IMMEDIATE`` transaction when the key changed in between).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from functools import partial
from typing import Final, TypeVar, cast

import aiosqlite
import anyio.lowlevel

from ...abc import TransactionalStateStore, reset_command
from ...exceptions import (
    StateStoreError,
)
from ...records import CircuitBreakerState
from ...serialization import from_dict, to_dict
from ._conn import _execute, _fetchone, _nothing
from ._database import MEMORY, _store_database
from ._inloop import MISS, InLoop
from ._schema import _json

logger = logging.getLogger("empathy_models.backends.sqlite")

T = TypeVar("T")

# --------------------------------------------------------------------------- circuit state


_SELECT_STATE: Final = "SELECT data, generation FROM circuit_state WHERE key = ?"
_INSERT_IF: Final = (
    "INSERT INTO circuit_state (key, generation, state, data, updated_at) "
    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING"
)
_UPDATE_IF: Final = (
    "UPDATE circuit_state SET generation = ?, state = ?, data = ?, updated_at = ? "
    "WHERE key = ? AND data = ?"
)


class SQLiteStateStore(TransactionalStateStore):
    """
    Circuit-breaker state in a SQLite file, shared by every process that opens it.

    Each store operation (`admit`, `record`, `force`, `reset`) reads the key's row
    without a lock (a WAL read never waits for writers) and runs the pure machine of
    `empathy_models.circuit` on it with ``clock()`` read after the row.  An operation
    that changes nothing (admitting while CLOSED, rejecting while OPEN) ends there.
    One that changes the state writes it with one statement that matches only if the
    row still holds the JSON read: then no write came in between, and every earlier
    write read its ``clock()`` before this one did.  When it does not match, the
    operation runs again in one ``BEGIN IMMEDIATE`` transaction, ``clock()`` read with
    the write lock held.  Either way time never runs backwards between two operations
    on one key on one host.  The reads and the conditional writes run in the event
    loop's thread when they cannot block (see `InLoop`), otherwise on the connection's
    thread.  States are stored as the versioned JSON of `empathy_models.serialization`.

    Args:
        path: the file, or ``":memory:"`` (a private database: ``shared`` is then
            false).
        clock: UTC epoch seconds (default `time.time`; tests inject a fake one).
        busy_timeout: seconds SQLite waits for another writer.
        lock_timeout: seconds an operation keeps retrying a locked file in total.
        read_only: open an existing empathy-models database read-only: nothing is
            created, migrated or switched to WAL.
        allow_foreign: add our tables to another application's file instead of refusing
            it.

    Raises:
        ConfigurationError: a bad option.
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
            # each :memory: store is a private database: nothing is shared with another
            self.shared = False  # type: ignore[misc]
        self._loop = InLoop(self._db)

    def __repr__(self) -> str:
        return f"SQLiteStateStore({self._path!r})"

    async def now(self) -> float:
        """
        The store's ``clock``, which times the states this process writes (every
        process on a host writing the file reads the same clock, unless given another).
        """
        self._check_open()
        return self._clock()

    @property
    def path(self) -> str:
        """The absolute path of the database file, or ``":memory:"``."""
        return self._path

    @property
    def busy_retries(self) -> int:
        """How often an operation found the file locked and retried."""
        return self._db.busy_retries

    async def _aopen(self) -> None:
        await self._db.run(_nothing)
        await self._loop.ready()

    def _decode(self, key: str, data: object) -> CircuitBreakerState:
        """The stored state of ``key``, or `StateStoreError` naming the key it belongs to."""
        try:
            if not isinstance(data, str):
                raise TypeError(f"expected JSON text, got {type(data).__name__}")
            state = from_dict(json.loads(data), CircuitBreakerState)
            if state.key != key:
                raise ValueError(f"the row holds the state of {state.key!r}")
        except (ValueError, TypeError, RecursionError, KeyError) as exc:
            raise StateStoreError(
                f"SQLite database {self._path}: the circuit state of {key!r} is unreadable "
                f"({type(exc).__name__}: {str(exc)[:200]}); repair it with "
                f"`{reset_command(key, '' if self._path == MEMORY else self._path)}`",
                target=self._path,
                key=key,
            ) from exc
        return state

    async def reset(self, key: str | None = None) -> None:
        """
        Return ``key`` (or every key) to a fresh CLOSED state; a row whose state cannot
        be read is replaced, which is how a corrupt row is repaired.
        """
        for _ in range(10_000):  # one pass per unreadable row found on the way
            try:
                await super().reset(key)
                return
            except StateStoreError as exc:
                if exc.key is None or (key is not None and exc.key != key):
                    raise
                logger.warning("replacing the unreadable circuit state of %r", exc.key)
                await self._delete(exc.key)
        raise StateStoreError(f"SQLite database {self._path}: reset did not finish")

    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        db = self._db
        clock = self._clock

        async def body(conn: aiosqlite.Connection) -> T:
            row = await _fetchone(conn, _SELECT_STATE, (key,))
            current = None if row is None else self._decode(key, row[0])
            new, result = fn(current, clock())  # now: read with the write lock held
            if new is not None and new is not current:
                sql, params, _ = _write(key, None if row is None else row[0], new)
                cursor = await conn.execute(sql, params)
                if cursor.rowcount != 1:  # cannot happen under the write lock
                    raise StateStoreError(
                        f"SQLite database {db.path}: the state of {key!r} changed "
                        "during a transaction",
                        target=db.path,
                    )
            return result

        return await db.run(partial(db.transaction, body=body))

    async def _row(self, key: str) -> sqlite3.Row | None:
        """
        ``key``'s row (data, generation), read without a lock.  A cancelled caller is
        cancelled here, before anything is read, even when nothing after suspends.
        """
        await anyio.lowlevel.checkpoint_if_cancelled()
        await self._loop.ready()
        row = self._loop.fetchone(_SELECT_STATE, (key,))
        if row is MISS:

            async def job(conn: aiosqlite.Connection) -> sqlite3.Row | None:
                return await self._db.retrying(partial(_fetchone, conn, _SELECT_STATE, (key,)))

            row = await self._db.run(job)
        return cast("sqlite3.Row | None", row)

    def _state_of(self, key: str, row: sqlite3.Row | None) -> CircuitBreakerState | None:
        return None if row is None else self._decoded(key, row[0], partial(self._decode, key))

    async def _peek(self, key: str) -> tuple[CircuitBreakerState | None, float, object] | None:
        row = await self._row(key)
        return self._state_of(key, row), self._clock(), None if row is None else row[0]

    async def _put_if(self, key: str, seen: object, new: CircuitBreakerState) -> bool:
        sql, params, data = _write(key, seen, new)
        changed = self._loop.write(sql, params)
        if changed is MISS:

            async def job(conn: aiosqlite.Connection) -> int:
                return await self._db.retrying(partial(_execute, conn, sql, params))

            changed = await self._db.run(job)
        if changed != 1:
            return False
        self._remember(key, data, new)
        return True

    async def _load(self, key: str) -> CircuitBreakerState | None:
        return self._state_of(key, await self._row(key))

    async def _load_all(self) -> list[CircuitBreakerState]:
        async def job(conn: aiosqlite.Connection) -> Iterable[sqlite3.Row]:
            return await self._db.retrying(
                partial(conn.execute_fetchall, "SELECT key, data FROM circuit_state ORDER BY key")
            )

        return [self._decode(row[0], row[1]) for row in await self._db.run(job)]

    async def _delete(self, key: str) -> None:
        """Delete ``key``'s row outright (how `reset` replaces an unreadable one)."""

        async def body(conn: aiosqlite.Connection) -> None:
            await conn.execute("DELETE FROM circuit_state WHERE key = ?", (key,))

        await self._db.run(partial(self._db.transaction, body=body))

    async def _aclose(self) -> None:
        try:
            await self._loop.close()
        finally:
            await self._db.close()


def _write(key: str, seen: object, new: CircuitBreakerState) -> tuple[str, tuple[object, ...], str]:
    """
    The statement that saves ``new`` if ``key``'s row still holds ``seen`` (the JSON
    read, or ``None``: no row), its parameters, and the JSON it stores; it changes one
    row or none.
    """
    data = _json(to_dict(new))
    now = new.updated_at_ts if new.updated_at_ts is not None else time.time()
    if seen is None:
        return _INSERT_IF, (key, new.generation, new.state.value, data, now), data
    return _UPDATE_IF, (new.generation, new.state.value, data, now, key, seen), data


SQLiteCircuitStateStore = SQLiteStateStore
"""Alias of `SQLiteStateStore` (the name used in the design issue)."""
