"""Circuit-breaker state in PostgreSQL: one locked row per key, database time."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, Final, TypeVar, cast

import asyncpg

from empathy_models.abc import ChangeFeed, TransactionalStateStore
from empathy_models.exceptions import RecordValidationError, StateStoreError
from empathy_models.records import CircuitBreakerState
from empathy_models.serialization import from_dict, to_dict

from ._common import DEFAULT_TABLE_PREFIX, Database, build_migrations
from ._feed import channel_of, payload, watch

__all__ = ["STATE_SCHEMA_VERSION", "PostgresCircuitStateStore"]

T = TypeVar("T")

_MIGRATIONS: Final = (
    (
        "CREATE TABLE IF NOT EXISTS {t_circuit_state} ("
        " key text PRIMARY KEY,"
        " state jsonb,"
        " updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    ),
)

STATE_SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The schema version of the circuit-state table this code writes."""


async def _keep_session(conn: object) -> None:
    """The pool's reset: nothing to undo (asyncpg has already ended any transaction)."""


class PostgresCircuitStateStore(TransactionalStateStore):
    """
    Circuit-breaker state shared by every process that uses the same database.

    One row per breaker key in ``<table_prefix>circuit_state``.  Every operation starts
    with one statement outside any transaction that reads the key's state and the
    database's ``clock_timestamp()``, and the pure machine of `empathy_models.circuit`
    runs on them.  An operation that changes nothing (admitting while CLOSED, rejecting
    while OPEN) ends there; one that changes the state writes it with one statement
    that matches only if the stored state is still the one read.  When it is not, the
    operation runs again as one transaction: the row is inserted if absent, locked
    with ``SELECT ... FOR UPDATE``, the machine is applied with ``now`` read after the
    lock is held, and the new state is written back.  Concurrent processes therefore
    serialize per key and agree on time.  A write that gives a key a new generation
    also sends ``pg_notify`` in its transaction, for the breakers' change feed (see
    `change_feed`).

    The store's sessions commit asynchronously (``synchronous_commit=off``, set when a
    connection is opened; ``server_settings={"synchronous_commit": "on"}`` in
    ``pool_options`` keeps the server's setting): a write returns without waiting for
    its WAL to reach the disk, which is most of a write's time on a disk that syncs.
    A crash of the database server (not of a client) can then lose the last fraction
    of a second of breaker writes: a few counted outcomes, never a torn state. Breaker
    state is re-learned from the next calls; other sessions and tables are unaffected.

    The store's pool keeps its connections' sessions as they are when one is returned
    to it (the store sets nothing in a session after connecting: no ``SET``,
    ``LISTEN`` or advisory lock), which saves asyncpg's reset query per operation; a
    ``reset`` passed in ``pool_options`` is used instead.

    Args:
        dsn, schema, table_prefix, create, **pool_options: as for
            `PostgresTelemetryBackend` (``schema`` and ``table_prefix`` also in the DSN's
            query string).
        listen: offer breakers the store's announcements (`change_feed`: one listening
            connection per store while a breaker is entered).  ``False`` behind a
            pooler that does not keep a session per connection (PgBouncer in
            transaction or statement mode), where ``LISTEN`` can miss notifications;
            the announcements are still sent.

    Raises:
        StateStoreError: driver errors, with the password removed from the DSN.
    """

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        create: bool = True,
        listen: bool = True,
        **pool_options: Any,
    ) -> None:
        self._listen = bool(listen)
        self._db = Database(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            error_type=StateStoreError,
            component="circuit_state",
            pool_options={
                "reset": _keep_session,
                **pool_options,
            },
            # the given server_settings win (checked first, as given)
            settings={"synchronous_commit": "off"},
            create=create,
            # read-only, a schema whose breaker table was never made (telemetry only:
            # breakers shared elsewhere) reads as empty, as a SQLite file does
            empty_when_missing=True,
        )
        self._table = table = self._db.table("circuit_state")
        self._migrations = build_migrations(self._db, _MIGRATIONS)
        self._peek_sql = (
            f"SELECT (SELECT state::text FROM {table} WHERE key = $1) AS state, "
            "extract(epoch FROM clock_timestamp())::float8 AS now"
        )
        # an absent row, or one the locked path inserted and left without a state
        self._insert_if_sql = (
            f"INSERT INTO {table} AS t (key, state) VALUES ($1, $2::jsonb) "
            "ON CONFLICT (key) DO UPDATE SET state = EXCLUDED.state, "
            "updated_at = clock_timestamp() WHERE t.state IS NULL RETURNING state::text"
        )
        self._update_if_sql = (
            f"UPDATE {table} SET state = $2::jsonb, updated_at = clock_timestamp() "
            "WHERE key = $1 AND state = $3::jsonb RETURNING state::text"
        )
        # the same, announcing a new generation when (and only when) the write happens
        self._channel = channel_of(table)
        self._insert_if_notify_sql = (
            f"WITH w AS ({self._insert_if_sql} AS state) SELECT w.state, pg_notify($3, $4) FROM w"
        )
        self._update_if_notify_sql = (
            f"WITH w AS ({self._update_if_sql} AS state) SELECT w.state, pg_notify($4, $5) FROM w"
        )
        self._feed: ChangeFeed | None = None

    def __repr__(self) -> str:
        return (
            f"PostgresCircuitStateStore({self._db.target!r}, schema={self._db.schema!r}, "
            f"table_prefix={self._db.table_prefix!r})"
        )

    async def _aopen(self) -> None:
        await self._db.pool(self._migrations)

    async def now(self) -> float:
        """The database's ``clock_timestamp()``, which times every operation's states."""
        self._check_open()
        return await self._db.clock(self._migrations)

    async def _aclose(self) -> None:
        if self._feed is not None:
            await self._feed.aclose()
        await self._db.close()

    def change_feed(self) -> ChangeFeed | None:
        """
        The store's announcements of new generations, by ``LISTEN`` on a channel named
        after the table (one connection of its own while a breaker listens); ``None``
        when built with ``listen=False``.
        """
        if not self._listen:
            return None
        if self._feed is None:
            self._feed = ChangeFeed(functools.partial(watch, self._db, self._channel), repr(self))
        return self._feed

    def _decode(self, raw: str | None) -> CircuitBreakerState | None:
        return None if raw is None else self._decode_text(raw)

    def _decode_text(self, raw: object) -> CircuitBreakerState:
        try:
            return from_dict(json.loads(cast(str, raw)), CircuitBreakerState)
        except (ValueError, RecordValidationError) as exc:
            raise StateStoreError(
                f"PostgreSQL circuit_state {self._db.target}: unreadable state: {exc}",
                target=self._db.target,
            ) from exc

    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        pool = await self._db.pool(self._migrations)
        async with (
            self._db.errors(f"update {key!r}"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            raw, now = await self._db.lock_row(conn, self._table, "state", key)
            current = self._decode(raw)
            new, result = fn(current, now)
            if new is not None and new is not current:
                await conn.execute(
                    f"UPDATE {self._table} SET state = $2::jsonb, "
                    "updated_at = clock_timestamp() WHERE key = $1",
                    key,
                    json.dumps(to_dict(new), separators=(",", ":")),
                )
                if current is None or current.generation != new.generation:
                    await conn.execute(
                        "SELECT pg_notify($1, $2)", self._channel, payload(key, new.generation)
                    )
        return result

    async def _peek(self, key: str) -> tuple[CircuitBreakerState | None, float, object] | None:
        pool = await self._db.pool(self._migrations)
        async with self._db.errors(f"read {key!r}"):
            row = await self._db.statement(pool, "fetchrow", self._peek_sql, key)
        raw = row["state"]
        state = None if raw is None else self._decoded(key, raw, self._decode_text)
        return state, float(row["now"]), raw

    async def _put_if(self, key: str, seen: object, new: CircuitBreakerState) -> bool:
        pool = await self._db.pool(self._migrations)
        data = json.dumps(to_dict(new), separators=(",", ":"))
        db = self._db
        args: tuple[object, ...]
        if seen is None:
            sql, args = self._insert_if_notify_sql, (key, data, self._channel)
        elif self._decoded(key, seen, self._decode_text).generation == new.generation:
            sql, args = self._update_if_sql, (key, data, seen)
        else:
            sql, args = self._update_if_notify_sql, (key, data, seen, self._channel)
        if sql is not self._update_if_sql:
            args += (payload(key, new.generation),)
        async with db.errors(f"update {key!r}"):
            try:
                stored = await db.statement(pool, "fetchval", sql, *args)
            except asyncpg.TransactionRollbackError:
                # under a stricter default_transaction_isolation than READ COMMITTED, a
                # write racing another session's fails (nothing written) instead of
                # finding the state changed: the operation takes the locked path
                return False
        if stored is None:
            return False
        self._remember(key, stored, new)  # the text the next read returns
        return True

    async def _load(self, key: str) -> CircuitBreakerState | None:
        if await self._db.absent(self._migrations):
            return None
        pool = await self._db.pool(self._migrations)
        async with self._db.errors(f"read {key!r}"):
            raw = await self._db.statement(
                pool, "fetchval", f"SELECT state::text FROM {self._table} WHERE key = $1", key
            )
        return None if raw is None else self._decoded(key, raw, self._decode_text)

    async def _load_all(self) -> list[CircuitBreakerState]:
        if await self._db.absent(self._migrations):
            return []
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("read all"):
            rows = await self._db.run(
                pool,
                "fetch",
                f"SELECT state::text AS state FROM {self._table} WHERE state IS NOT NULL",
            )
        out = [self._decode(row["state"]) for row in rows]
        return [s for s in out if s is not None]

    async def drop_tables(self) -> None:
        """Drop this store's table (for tests and decommissioning); irreversible."""
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with (
            self._db.errors("drop"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            await conn.execute(f"DROP TABLE IF EXISTS {self._table}")
            await conn.execute(
                f"DELETE FROM {self._db.table('schema_version')} WHERE component = $1",
                self._db.component,
            )
