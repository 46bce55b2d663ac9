"""Budgets and rate limits in PostgreSQL: one locked row per key, database time."""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg

from empathy_models.abc import TransactionalQuotaStore
from empathy_models.backends import shown
from empathy_models.exceptions import StateStoreError
from empathy_models.limits import WINDOW_RETENTION

from ._common import DEFAULT_TABLE_PREFIX, Database, build_migrations, text_digest

__all__ = ["QUOTA_SCHEMA_VERSION", "PostgresQuotaStore"]

T = TypeVar("T")

logger = logging.getLogger("empathy_models.backends.postgres")

_KEY: Final = text_digest("key")
"""What the quota table's unique index holds: the SHA-256 digest of a row's key."""

_MATCH: Final = f"{_KEY} = {text_digest('$1::text')} AND key = $1::text"
"""The row of key ``$1``, looked up on the index of digests."""

_MIGRATIONS: Final = (
    (
        "CREATE TABLE IF NOT EXISTS {t_quota} ("
        " key text PRIMARY KEY,"
        " data jsonb,"
        " updated_at timestamptz NOT NULL DEFAULT clock_timestamp())",
    ),
    # version 2: keys of any length.  A btree entry holds about 2,700 bytes, and the
    # primary key held whole keys, which hold the names of a budget's scope (a
    # workflow, a user): the server refused a long one's every operation.  The rows
    # stay; the key is unique by its digest.  (The primary key's name is looked up:
    # PostgreSQL shortens a long table name's ``<table>_pkey``.)
    (
        "DO $$ DECLARE pkey text; BEGIN"
        " SELECT conname INTO pkey FROM pg_constraint"
        " WHERE conrelid = '{t_quota}'::regclass AND contype = 'p';"
        " IF pkey IS NOT NULL THEN"
        " EXECUTE format('ALTER TABLE {t_quota} DROP CONSTRAINT %I', pkey);"
        " END IF; END $$",
        f"CREATE UNIQUE INDEX IF NOT EXISTS {{i_quota_key}} ON {{t_quota}} ({_KEY})",
    ),
)

_SWEEP: Final = (
    "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} "
    "WHERE left(key, 2) = 'b|' AND (data->>'window_end')::float8 < $1 "
    "FOR UPDATE SKIP LOCKED))"
)
"""The sweep of budget windows that ended before ``$1``.  A row another session holds
(an operation on an ended window, another process's sweep) is skipped, not waited for,
and left to a later sweep: two sweeps locking the same rows in different orders would
deadlock."""

QUOTA_SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The schema version of the quota table this code writes."""

_ESCAPE: Final = "\x01"
"""The character that begins each escape in a stored key (`_stored_key`)."""

_TO_ESCAPE: Final = re.compile("[\x00\x01\ud800-\udfff]")
"""What a stored key holds escaped: a NUL and a surrogate (which PostgreSQL text cannot
hold: in a ``str``, a surrogate is always a lone one), and `_ESCAPE` itself."""

_ESCAPED: Final = re.compile("\x01(?:[\x01]|0|u[0-9a-f]{4})")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == _ESCAPE:
        return _ESCAPE + _ESCAPE
    return _ESCAPE + ("0" if char == "\x00" else f"u{ord(char):04x}")


def _unescape(match: re.Match[str]) -> str:
    code = match.group()[1:]
    if code == _ESCAPE:
        return _ESCAPE
    return "\x00" if code == "0" else chr(int(code[1:], 16))


def _stored_key(key: str) -> str:
    """
    The ``key`` column of ``key``, one to one: the key itself unless it holds what
    PostgreSQL text cannot (a NUL, a lone surrogate: a budget's name or a user id may)
    or `_ESCAPE`; each of those is written as `_ESCAPE` and a code (``0`` for a NUL,
    ``u`` and four hex digits for a surrogate, the escape doubled).  Character by
    character, so a prefix's stored form begins the stored form of every key that
    begins with the prefix (`PostgresQuotaStore._scan`).
    """
    if key.isascii() and "\x00" not in key and _ESCAPE not in key:
        return key  # the usual key: as it is, at the cost of three scans of it
    return _TO_ESCAPE.sub(_escape, key)


def _given_key(stored: str) -> str:
    """The key whose ``key`` column is ``stored`` (`_stored_key` undone)."""
    return _ESCAPED.sub(_unescape, stored) if _ESCAPE in stored else stored


class PostgresQuotaStore(TransactionalQuotaStore):
    """
    Spend budgets and rate-limit schedules shared by every process using the database.

    One row per key in ``<table_prefix>quota``, found by the key's SHA-256 digest: a
    key holds the names of a budget's scope (a workflow, a user), which may be longer
    than a btree entry holds (about 2,700 bytes), and any characters, as in
    `MemoryQuotaStore`: a NUL or a lone surrogate, which PostgreSQL text cannot hold,
    is stored escaped (`_stored_key`).  A budget's window is dropped a week
    (`empathy_models.limits.WINDOW_RETENTION`) after it ended, checked once an hour in
    each process, the time being the database's when a budget write's window holds it
    (the callers' clock agrees), else the newest such window's start, once the budget
    write that found it due has committed; a window another session holds then is
    skipped, left to a later check, not waited for.  Every operation
    is one transaction: the row is inserted if absent, locked with ``SELECT ... FOR
    UPDATE``, the pure step of `empathy_models.limits.meter` runs with ``now`` from the
    database's ``clock_timestamp()`` read after the lock is held, and the row is written
    back; concurrent processes serialize per key and agree on time.

    Args:
        dsn, schema, table_prefix, create, **pool_options: as for
            `PostgresCircuitStateStore`.

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
        **pool_options: Any,
    ) -> None:
        self._db = Database(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            error_type=StateStoreError,
            component="quota",
            pool_options=pool_options,
            create=create,
            # read-only, a schema whose quota table was never made (no budget used) reads
            # as empty, as a SQLite file without it does; a schema with no empathy-models
            # tables at all is still refused (a misspelt ``?schema=``)
            empty_when_missing=True,
        )
        self._table = self._db.table("quota")
        self._migrations = build_migrations(self._db, _MIGRATIONS)
        self._sweep_at = -math.inf  # the window start from which ended windows are dropped

    def __repr__(self) -> str:
        return (
            f"PostgresQuotaStore({self._db.target!r}, schema={self._db.schema!r}, "
            f"table_prefix={self._db.table_prefix!r})"
        )

    async def _aopen(self) -> None:
        await self._db.open(self._migrations)

    async def _aclose(self) -> None:
        await self._db.close()

    def _decode(self, raw: str | None) -> dict[str, Any] | None:
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StateStoreError(
                f"PostgreSQL quota {self._db.target}: unreadable row: {exc}",
                target=self._db.target,
            ) from exc
        return data if isinstance(data, dict) else None

    async def _transact(
        self, key: str, fn: Callable[[dict[str, Any] | None, float], tuple[Any, T]]
    ) -> T:
        pool = await self._db.pool(self._migrations)
        stored = _stored_key(key)
        async with (
            self._db.errors(f"update {shown(key)}"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            raw, now = await self._db.lock_row(
                conn, self._table, "data", stored, unique=_KEY, match=_MATCH
            )
            new, result = fn(self._decode(raw), now)
            if new is not None:
                await conn.execute(
                    f"UPDATE {self._table} SET data = $2::jsonb, "
                    f"updated_at = clock_timestamp() WHERE {_MATCH}",
                    stored,
                    json.dumps(new, separators=(",", ":")),
                )
        if new is not None and key.startswith("b|") and _sweep_time(new, now) >= self._sweep_at:
            await self._sweep(pool, _sweep_time(new, now))
        return result

    async def _sweep(self, pool: asyncpg.Pool, newest: float) -> None:
        """
        Drop the budget windows that ended a week (`WINDOW_RETENTION`) before ``newest``,
        as the other stores do: one scan of the table an hour, after the write that
        started it committed (so no budget's row is held while the table is scanned).
        The write is done: a sweep that fails is logged, not raised, and tried again an
        hour later.
        """
        self._sweep_at = newest + 3600.0
        try:
            async with self._db.errors("sweep ended budget windows"):
                await self._db.run(
                    pool, "execute", _SWEEP.format(table=self._table), newest - WINDOW_RETENTION
                )
        except StateStoreError as exc:
            logger.warning("%s; trying again in an hour", exc)

    async def now(self) -> float:
        """The database's ``clock_timestamp()``, by which every operation lapses holds."""
        self._check_open()
        return await self._db.clock(self._migrations)

    async def _load(self, key: str) -> dict[str, Any] | None:
        if await self._db.absent(self._migrations):
            return None
        pool = await self._db.pool(self._migrations)
        async with self._db.errors(f"read {shown(key)}"):
            raw = await self._db.statement(
                pool,
                "fetchval",
                f"SELECT data::text FROM {self._table} WHERE {_MATCH}",
                _stored_key(key),
            )
        return self._decode(raw)

    async def _scan(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        if await self._db.absent(self._migrations):
            return []
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("scan"):
            rows = await self._db.run(
                pool,
                "fetch",
                f"SELECT key, data::text AS data FROM {self._table} "
                "WHERE left(key, length($1)) = $1 AND data IS NOT NULL ORDER BY key",
                _stored_key(prefix),
            )
        out = []
        for row in rows:
            data = self._decode(row["data"])
            if data is not None:
                out.append((_given_key(row["key"]), data))
        return out

    async def _delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("delete"):
            await self._db.run(
                pool,
                "execute",
                f"DELETE FROM {self._table} WHERE {_KEY} = ANY(ARRAY("
                f"SELECT {text_digest('k')} FROM unnest($1::text[]) AS k)) "
                "AND key = ANY($1::text[])",
                [_stored_key(key) for key in keys],
            )


def _sweep_time(window: dict[str, Any], now: float) -> float:
    """
    The time a budget window just written tells (as `empathy_models.limits.values.
    sweep_time`): the database's ``now`` when the window holds it, else its start.
    """
    start = float(window["window_start"])
    return now if start <= now < float(window["window_end"]) else start
