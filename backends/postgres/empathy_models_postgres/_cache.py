"""The response cache in PostgreSQL: one row per answer with its expiry."""

from __future__ import annotations

import hashlib
import math
from typing import Any, Final

from empathy_models.abc import ResponseCache
from empathy_models.backends import shown
from empathy_models.cache import DEFAULT_MAX_VALUE_BYTES, MAX_TTL, lease_ttl
from empathy_models.exceptions import ConfigurationError, StateStoreError

from ._common import DEFAULT_TABLE_PREFIX, Database, build_migrations

__all__ = ["CACHE_SCHEMA_VERSION", "PostgresResponseCache"]

_MIGRATIONS: Final = (
    (
        "CREATE TABLE IF NOT EXISTS {t_response_cache} ("
        " key text PRIMARY KEY,"
        " value bytea NOT NULL,"
        " expires_at timestamptz NOT NULL)",
        "CREATE INDEX IF NOT EXISTS {i_response_cache_expiry} ON {t_response_cache} (expires_at)",
    ),
    # version 2: the leases (`PostgresResponseCache.acquire_lease`), apart from the entries
    (
        "CREATE TABLE IF NOT EXISTS {t_response_cache_lease} ("
        " key text PRIMARY KEY,"
        " holder text NOT NULL,"
        " expires_at timestamptz NOT NULL)",
    ),
)

# one statement: the lease taken when free, expired or the holder's (then renewed);
# whether it was, and the lease as this statement's snapshot saw it otherwise
_TAKE: Final = (
    "WITH taken AS (INSERT INTO {lease} AS l (key, holder, expires_at)"
    " VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))"
    " ON CONFLICT (key) DO UPDATE SET holder = EXCLUDED.holder,"
    " expires_at = EXCLUDED.expires_at"
    " WHERE l.expires_at <= clock_timestamp() OR l.holder = EXCLUDED.holder RETURNING 1)"
    " SELECT EXISTS (SELECT 1 FROM taken), holder,"
    " extract(epoch FROM expires_at - clock_timestamp())::float8"
    " FROM (SELECT 1) AS one LEFT JOIN {lease} ON key = $1"
)

# `_TAKE` for a lease taken by a session that committed after its snapshot: an upsert
# that always writes (the row locked and read in its latest version, kept unchanged
# unless free, expired or the holder's); whether it is the holder's now, and the lease
_TAKE_LOCKED: Final = (
    "INSERT INTO {lease} AS l (key, holder, expires_at)"
    " VALUES ($1, $2, clock_timestamp() + make_interval(secs => $3))"
    " ON CONFLICT (key) DO UPDATE SET"
    " holder = CASE WHEN l.expires_at <= statement_timestamp() OR l.holder = EXCLUDED.holder"
    " THEN EXCLUDED.holder ELSE l.holder END,"
    " expires_at = CASE WHEN l.expires_at <= statement_timestamp() OR l.holder = EXCLUDED.holder"
    " THEN EXCLUDED.expires_at ELSE l.expires_at END"
    " RETURNING holder = $2, holder, extract(epoch FROM expires_at - clock_timestamp())::float8"
)

CACHE_SCHEMA_VERSION: Final = len(_MIGRATIONS)
"""The schema version of the response-cache table this code writes."""

_ESCAPE: Final = "\x01"
"""The first character of every key stored in another form than itself (`_stored_key`)."""

_RAW_MAX: Final = 1000
"""The most UTF-8 bytes of a key stored as itself or spelled in hex: below what one
entry of the primary-key index holds (2,704 bytes), whatever the key's characters."""


def _stored_key(key: str) -> str:
    """
    The ``key`` column of ``key``, one to one: the key itself when PostgreSQL text holds
    it (no NUL, no lone surrogate, which no `request_key` digest holds but a caller's own
    key may), it is at most `_RAW_MAX` bytes and does not begin with `_ESCAPE`;
    otherwise `_ESCAPE` and the hex of its UTF-8 bytes (lone surrogates kept, as
    ``surrogatepass``), or, past `_RAW_MAX` bytes, ``#`` and their SHA-256 (as
    `request_key` itself is a digest, two keys meet only if SHA-256 collides).
    """
    if key.isascii():  # every request_key digest
        fits = len(key) <= _RAW_MAX
    else:
        try:
            fits = len(key.encode("utf-8")) <= _RAW_MAX
        except UnicodeEncodeError:
            fits = False
    if fits and "\x00" not in key and not key.startswith(_ESCAPE):
        return key
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= _RAW_MAX:
        return _ESCAPE + raw.hex()
    return _ESCAPE + "#" + hashlib.sha256(raw).hexdigest()


class PostgresResponseCache(ResponseCache):
    """
    Answers shared by every process using the same database.

    In ``<table_prefix>response_cache``.  Expiry is checked against the database's
    clock; one write in a hundred also deletes expired rows and, past ``max_entries``,
    the rows closest to expiry, skipping those another session is writing meanwhile
    (so two processes sweeping at once never wait for each other).  Any string is a
    key, as in `MemoryResponseCache`: one a text column cannot hold as itself (a NUL, a
    lone surrogate, over 1,000 bytes, or beginning with ``\x01``) is stored in a form
    of its own, kept apart from every other key's.  `acquire_lease_and_get` is
    `ResponseCache`'s: the take, then the read in a statement of its own (a statement
    reads the rows committed before it began, and a take may be granted by a release
    committed since, with the holder's entry before it, which only a later statement
    reads).

    Args:
        dsn, schema, table_prefix, create, **pool_options: as for the other PostgreSQL
            backends.
        max_entries: default 100,000.
        max_value_bytes: larger values are not stored.

    Raises:
        StateStoreError: for any error.
    """

    shared = True

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None = None,
        table_prefix: str = DEFAULT_TABLE_PREFIX,
        create: bool = True,
        max_entries: int = 100_000,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        **pool_options: Any,
    ) -> None:
        for name, value in (("max_entries", max_entries), ("max_value_bytes", max_value_bytes)):
            # PostgreSQL binds a bigint: a larger bound would fail every write
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
                raise ConfigurationError(
                    f"{name} must be an integer >= 1 and < 2**63, got {shown(value)}"
                )
        self.max_entries = max_entries
        self.max_value_bytes = max_value_bytes
        self._db = Database(
            dsn,
            schema=schema,
            table_prefix=table_prefix,
            error_type=StateStoreError,
            component="response_cache",
            pool_options=pool_options,
            create=create,
        )
        self._table = self._db.table("response_cache")
        self._lease = self._db.table("response_cache_lease")
        self._migrations = build_migrations(self._db, _MIGRATIONS)
        self._writes = 0

    def __repr__(self) -> str:
        return f"PostgresResponseCache({self._db.target!r}, schema={self._db.schema!r})"

    async def _aopen(self) -> None:
        await self._db.open(self._migrations)

    async def _aclose(self) -> None:
        await self._db.close()

    async def get(self, key: str) -> bytes | None:
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("get"):
            value = await self._db.statement(
                pool,
                "fetchval",
                f"SELECT value FROM {self._table} "
                "WHERE key = $1 AND expires_at > clock_timestamp()",
                _stored_key(key),
            )
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        self._check_open()
        if len(value) > self.max_value_bytes or not ttl > 0 or not math.isfinite(ttl):
            await self.delete(key)  # refused: no earlier value is left to be served
            return
        pool = await self._db.pool(self._migrations)
        self._writes += 1
        async with (
            self._db.errors("set"),
            self._db.connection(pool) as conn,
            self._db.transaction(conn),
        ):
            await conn.execute(
                f"INSERT INTO {self._table} (key, value, expires_at) VALUES "
                "($1, $2, clock_timestamp() + make_interval(secs => $3)) "
                "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, "
                "expires_at = EXCLUDED.expires_at",
                _stored_key(key),
                value,
                float(min(ttl, MAX_TTL)),
            )
            if self._writes % 100 == 1:
                # the rows another session holds are skipped, not waited for: its own
                # sweep may be waiting for the row written above (a deadlock)
                await conn.execute(
                    f"DELETE FROM {self._table} WHERE key IN (SELECT key FROM {self._table}"
                    " WHERE expires_at <= clock_timestamp() FOR UPDATE SKIP LOCKED)"
                )
                await conn.execute(  # and the leases crashed holders left
                    f"DELETE FROM {self._lease} WHERE key IN (SELECT key FROM {self._lease}"
                    " WHERE expires_at <= clock_timestamp() FOR UPDATE SKIP LOCKED)"
                )
                await conn.execute(
                    f"DELETE FROM {self._table} WHERE key IN (SELECT key FROM {self._table}"
                    f" WHERE key IN (SELECT key FROM {self._table} ORDER BY expires_at DESC"
                    " OFFSET $1) FOR UPDATE SKIP LOCKED)",
                    self.max_entries,
                )

    async def delete(self, key: str) -> bool:
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("delete"):
            status: str = await self._db.run(
                pool, "execute", f"DELETE FROM {self._table} WHERE key = $1", _stored_key(key)
            )
        return status.endswith(" 1")

    async def clear(self) -> int:
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("clear"):
            # the expired rows go uncounted, as every backend counts
            count: int = await self._db.run(
                pool,
                "fetchval",
                f"WITH gone AS (DELETE FROM {self._table} RETURNING expires_at) "
                "SELECT count(*) FROM gone WHERE expires_at > clock_timestamp()",
            )
        return int(count)

    leases = True

    async def acquire_lease(self, key: str, holder: str, ttl: float) -> tuple[str, float] | None:
        """
        One statement (an upsert kept only when the lease is free, expired or
        ``holder``'s), by the database's clock; when a holder that committed after the
        statement's snapshot took it, a second one that locks the lease's row and
        answers from its latest version (taken if free or expired by then, else who
        holds it): never None for a lease another holds.
        """
        self._check_open()
        ttl = lease_ttl(ttl)
        pool = await self._db.pool(self._migrations)
        stored = _stored_key(key)
        async with self._db.errors("acquire_lease"):
            took, held, left = await self._db.statement(
                pool, "fetchrow", _TAKE.format(lease=self._lease), stored, holder, ttl
            )
            if not took and held is None:  # a holder the statement's snapshot did not see
                took, held, left = await self._db.statement(
                    pool, "fetchrow", _TAKE_LOCKED.format(lease=self._lease), stored, holder, ttl
                )
        if took:
            return None
        return str(held), max(float(left), 0.0)

    async def release_lease(self, key: str, holder: str) -> bool:
        self._check_open()
        pool = await self._db.pool(self._migrations)
        async with self._db.errors("release_lease"):
            live: bool | None = await self._db.statement(
                pool,
                "fetchval",
                f"DELETE FROM {self._lease} WHERE key = $1 AND holder = $2"
                " RETURNING expires_at > clock_timestamp()",  # an expired lease is no one's
                _stored_key(key),
                holder,
            )
        return bool(live)
