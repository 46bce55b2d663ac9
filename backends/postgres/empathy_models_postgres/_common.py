"""
Shared plumbing: DSN options, the connection pool, error mapping, and the row lock the
circuit-state and quota stores' transactions begin with (`Database.lock_row`); the
pool's creation runs the migrations of `_migrations`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import math
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg

from empathy_models.backends import redact_url, shown, url_flaw
from empathy_models.exceptions import (
    BackendError,
    ConfigurationError,
    SchemaVersionError,
)

from ._migrations import (
    NAME_BYTES,
    Migration,
    build_migrations,
    check_tables,
    migrate,
    quote_ident,
)

__all__ = [
    "DEFAULT_TABLE_PREFIX",
    "Database",
    "Migration",
    "build_migrations",
    "quote_ident",
    "split_dsn",
    "text_digest",
]

DEFAULT_TABLE_PREFIX: Final = "empathy_"
"""Prefix of every table the plugin creates."""

_NOW_SQL: Final = "SELECT extract(epoch FROM clock_timestamp())::float8"
"""The database's clock, which times every store's operations (UTC epoch seconds)."""

_IDENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_URL_OPTIONS: Final = frozenset({"schema", "table_prefix", "connect_timeout"})
"""The DSN query's options taken out before asyncpg reads it: the plugin's own, and
libpq's ``connect_timeout``, which asyncpg would send to the server as a setting (which
the server refuses: every connection would fail)."""

_POOL_ONLY: Final = frozenset(
    {
        "init_size",
        "min_size",
        "max_size",
        "max_queries",
        "max_inactive_connection_lifetime",
        "connect",
        "setup",
        "init",
        "reset",
        "loop",
    }
)
"""`asyncpg.create_pool` options that `asyncpg.connect` does not take."""

_DRIVER_ERRORS: Final = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # a query on a connection whose session the server has just ended (its last message
    # read, not yet its end): asyncpg finds its protocol in a state it cannot leave
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)

logger = logging.getLogger("empathy_models.backends.postgres")

OPEN_TIMEOUT: Final = 2.0
"""Seconds a store's open waits for the database before leaving it to the first use."""

CLOSE_TIMEOUT: Final = 5.0
"""Seconds `Database.close` waits for the pool to close cleanly before terminating it."""

_LOCK_ATTEMPTS: Final = 10
"""Times `Database.lock_row` inserts a row that other sessions keep deleting."""

KEPT_STATEMENTS: Final = 10_000
"""Statements run on the kept connection before it goes back to the pool once (see
`Database.statement`), so the pool's own rules (``max_queries``, its inactive-connection
lifetime) still apply to it now and then."""


class _OneWarningPerOutage(logging.Filter):
    """
    asyncpg's pool logs a full traceback each time it fails to restore its minimum of
    connections (every few seconds during an outage).  This filter lets the first of
    them through as one line and drops the rest until an operation succeeds again.
    """

    def __init__(self) -> None:
        super().__init__()
        self.outage = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Failed to restore the pool connection floor"):
            return True
        if self.outage:
            return False
        self.outage = True
        exc = record.exc_info[1] if record.exc_info else None
        record.msg = (
            "asyncpg cannot restore its pool's connections (%s); it keeps retrying, "
            "quietly until the database answers again"
        )
        record.args = ("unknown error" if exc is None else f"{type(exc).__name__}: {exc}",)
        record.exc_info = None
        record.exc_text = None
        return True


_POOL_LOG_FILTER: Final = _OneWarningPerOutage()
logging.getLogger("asyncpg.pool").addFilter(_POOL_LOG_FILTER)


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A done callback: take the outcome of a task nobody awaits any more (asyncio would
    log an exception left there as never retrieved)."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("an abandoned operation failed: %r", task.exception())


def _retrieve_unawaited_negotiations() -> None:
    """
    Take the failure asyncpg leaves in its SSL negotiation's future when nobody awaits
    it any more, which asyncio would log as "Future exception was never retrieved".

    With ``sslmode=prefer`` (the default) every connect, and every cancel request of an
    interrupted query, first asks the server for SSL (``connect_utils.TLSUpgradeProto``);
    its ``connection_lost`` fails that future when the socket closes before the answer.
    A connect cancelled just after its socket was set up (a caller's deadline passing
    while the pool reconnects after a restart), or a cancel request that asyncpg
    cancels because its connection was lost meanwhile, leaves it failed and unawaited.
    The wrapped ``connection_lost`` marks it retrieved (a waiter still gets it).
    Nothing changes where asyncpg has no such class.
    """
    proto = getattr(getattr(asyncpg, "connect_utils", None), "TLSUpgradeProto", None)
    lost = getattr(proto, "connection_lost", None)
    if proto is None or lost is None or getattr(lost, "empathy_retrieves", False):
        return

    @functools.wraps(lost)
    def connection_lost(self: Any, exc: Exception | None) -> None:
        lost(self, exc)
        future = getattr(self, "on_data", None)
        if isinstance(future, asyncio.Future) and future.done() and not future.cancelled():
            future.exception()

    connection_lost.empathy_retrieves = True  # type: ignore[attr-defined]
    proto.connection_lost = connection_lost


_retrieve_unawaited_negotiations()


def text_digest(text: str) -> str:
    """
    SQL for the SHA-256 digest of the text expression ``text`` (its bytes as stored):
    what an index keys a text on when the text may be longer than a btree entry can
    hold (about 2,700 bytes).  ``decode(..., 'escape')`` with the backslashes doubled
    gives the text's own bytes and, unlike ``convert_to``, may be used in an index.
    """
    return f"sha256(decode(replace({text}, chr(92), chr(92) || chr(92)), 'escape'))"


@functools.cache
def pool_option_names() -> frozenset[str]:
    """The keyword options `asyncpg.create_pool` takes: its own and, passed on,
    `asyncpg.connect`'s."""
    return frozenset(
        parameter.name
        for function in (asyncpg.create_pool, asyncpg.connect)
        for parameter in inspect.signature(function).parameters.values()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    )


def split_dsn(dsn: str) -> tuple[str, dict[str, str]]:
    """Take the plugin's own options (``schema``, ``table_prefix``) and libpq's
    ``connect_timeout`` out of the DSN query."""
    if not isinstance(dsn, str) or "://" not in dsn:
        shown = redact_url(dsn) if isinstance(dsn, str) else repr(dsn)
        raise ConfigurationError(f"expected a postgresql:// DSN, got {shown}")
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError as exc:
        raise ConfigurationError(
            f"{redact_url(dsn)!r} is not a valid PostgreSQL DSN: {url_flaw(exc)}"
        ) from exc
    query = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in query if k in _URL_OPTIONS}
    if not ours:
        return dsn, ours
    rest = urlencode([(k, v) for k, v in query if k not in _URL_OPTIONS])
    # not urlunsplit: it turns an empty host ("postgresql:///db") into "postgresql:/db"
    tail = (f"?{rest}" if rest else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{parts.netloc}{parts.path}{tail}", ours


def _connect_timeout(text: str | None) -> float | None:
    """
    A DSN's ``connect_timeout`` (libpq's: seconds to wait for a connection) as asyncpg's
    connect ``timeout``; None when the DSN has none.
    """
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ConfigurationError(
            "connect_timeout in the DSN must be a number of seconds > 0 (the time asyncpg "
            f"waits for a connection), got {text!r}"
        )
    return seconds


def _check_pool_sizes(component: str, options: dict[str, Any]) -> None:
    """
    Refuse, at construction, the pool options `asyncpg.create_pool` would refuse when
    the pool is created (at open or at the first operation, as a ``ValueError`` or
    ``TypeError`` of its own): its sizes, ``max_queries``, the inactive connections'
    lifetime and ``command_timeout``; a connect ``timeout`` that is no time (every
    connection would time out at once) or not a number (a ``TypeError`` of asyncio's);
    ``server_settings`` other than a dict of strings.
    """

    def refuse(why: str) -> ConfigurationError:
        return ConfigurationError(f"PostgreSQL {component}: {why}")

    sizes: dict[str, int] = {}
    for name, low in (("min_size", 0), ("max_size", 1), ("init_size", 0)):
        value = options.get(name)
        if name not in options or (name == "init_size" and value is None):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise refuse(f"{name} must be an integer >= {low}, got {shown(value)}")
        sizes[name] = value
    low_size, high_size = sizes.get("min_size", 0), sizes.get("max_size", 10)
    if low_size > high_size:
        raise refuse(
            f"min_size ({low_size}) is greater than max_size ({high_size}); a min_size "
            "above the default max_size of 10 needs a max_size at least as large"
        )
    init = sizes.get("init_size")
    if init is not None and not low_size <= init <= high_size:
        raise refuse(f"init_size ({init}) must be from min_size to max_size")
    settings = options.get("server_settings")
    if settings is not None and (
        not isinstance(settings, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in settings.items())
    ):
        raise refuse(f"server_settings must be a dict of str to str, got {shown(settings)}")
    for name, least in (
        ("max_queries", "> 0"),
        ("max_inactive_connection_lifetime", ">= 0"),
        ("command_timeout", "> 0"),
        ("timeout", "> 0"),  # the connect timeout
    ):
        value = options.get(name)
        if name not in options or (name.endswith("timeout") and value is None):
            continue  # asyncpg's default, or no time limit
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or math.isnan(value)
            or value < 0
            or (least == "> 0" and value == 0)
        ):
            raise refuse(f"{name} must be a number {least}, got {shown(value)}")


class Database:
    """
    One lazily created asyncpg pool, the tables' qualified names, and migrations.

    The pool is created on first use inside the running event loop; `close` closes it.
    Errors from the driver are raised as ``error_type`` with the DSN redacted.  Every
    operation takes its connection through `connection`, `run` or `statement`, which
    give it back with `release`, never through the pool's own ``fetch`` / ``execute`` /
    ``async with pool.acquire()``: those give it back in the caller's task, and a
    caller cancelled meanwhile leaves the release's failure unretrieved (see `release`).
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str | None,
        table_prefix: str,
        error_type: type[BackendError],
        component: str,
        pool_options: dict[str, Any],
        create: bool = True,
        empty_when_missing: bool = False,
        settings: dict[str, str] | None = None,
    ) -> None:
        unknown = sorted(set(pool_options) - pool_option_names())
        if unknown:
            # refused here, not by asyncpg at the first connection
            raise ConfigurationError(
                f"PostgreSQL {component}: unknown options {unknown}; options other than "
                "the backend's own go to asyncpg.create_pool, which does not take these"
            )
        url, options = split_dsn(dsn)
        connect_timeout = _connect_timeout(options.get("connect_timeout"))
        schema = options.get("schema", schema)
        table_prefix = options.get("table_prefix", table_prefix)
        if schema is not None and not _IDENT.match(schema):
            raise ConfigurationError(
                f"schema must be a plain SQL identifier (letters, digits, _), got {schema!r}"
            )
        if schema is not None and len(schema) > NAME_BYTES:
            # (an identifier of ASCII letters, digits and _: a byte per character)
            raise ConfigurationError(
                f"schema {schema} is too long: PostgreSQL cuts names to {NAME_BYTES} "
                "bytes, so every schema named alike up to there would be one; name it by "
                f"its first {NAME_BYTES} characters ({schema[:NAME_BYTES]}), where its "
                "tables are"
            )
        if not _IDENT.match(table_prefix):
            raise ConfigurationError(
                "table_prefix must be a plain SQL identifier (letters, digits, _), "
                f"got {table_prefix!r}"
            )
        self.dsn = url
        self.target = redact_url(url)
        self.schema = schema
        self.table_prefix = table_prefix
        self.error_type = error_type
        self.component = component
        self.create = bool(create)
        # without ``create``: whether this component's tables may be missing from a schema
        # that holds others' (then `missing` is set and the component reads as empty)
        self.empty_when_missing = empty_when_missing
        self.missing = False
        self._lost_releases = 0  # releases that failed (`release`): sessions ended
        self.pool_options: dict[str, Any] = {
            "min_size": 1,
            "max_size": 10,
            "command_timeout": 30.0,
            "timeout": 10.0,
        }
        if connect_timeout is not None:
            self.pool_options["timeout"] = connect_timeout  # a keyword ``timeout`` wins
        self.pool_options.update(pool_options)
        _check_pool_sizes(component, self.pool_options)
        if settings:  # the component's server settings, unless given otherwise
            given = self.pool_options.get("server_settings") or {}
            self.pool_options["server_settings"] = {**settings, **given}
        self._pool: asyncpg.Pool | None = None
        self._lock: asyncio.Lock | None = None
        # the pool being created has connected, and its tables are being migrated; a
        # migration that outlasted the open goes on in this task (see `open`)
        self._migrating = False
        self._opening: asyncio.Task[asyncpg.Pool] | None = None
        # the connection kept between statements (see `statement`) and its use count
        self._kept: asyncpg.Connection | None = None
        self._kept_uses = 0

    def table(self, name: str) -> str:
        """The quoted, schema-qualified name of table ``prefix + name``."""
        quoted = quote_ident(self.table_prefix + name)
        return quoted if self.schema is None else f"{quote_ident(self.schema)}.{quoted}"

    def error(self, what: str, exc: BaseException) -> BackendError:
        message = str(exc).replace(self.dsn, self.target)
        if not message.strip() and isinstance(exc, TimeoutError):
            # asyncio's timeouts carry no text: say what timed out, and after how long
            option = "timeout" if what == "connect" else "command_timeout"
            limit = self.pool_options.get(option)
            message = "timed out" + ("" if limit is None else f" after {limit:g} s")
        elif not message.strip():
            message = "(no message)"
        return self.error_type(
            f"PostgreSQL {self.component} {self.target}: {what} failed: "
            f"{type(exc).__name__}: {message}",
            target=self.target,
        )

    async def open(self, migrations: Sequence[Migration]) -> None:
        """
        Create the pool at open if the database answers within `OPEN_TIMEOUT` seconds;
        if it cannot be reached, warn
        and leave it to the first operation (which raises the backend's error until the
        database is back), so a worker starts during an outage and runs degraded, as
        with Redis.  A schema newer than this code still fails the open.  A migration
        still running then (an upgrade over a large table, or one waiting for another
        session's lock) is not cut short, which would roll it back for the first
        operation to run again from the start: it goes on in the background
        (`_opening`), and operations wait for it.
        """
        task = asyncio.get_running_loop().create_task(self.pool(migrations))
        try:
            await asyncio.wait_for(asyncio.shield(task), OPEN_TIMEOUT)
        except TimeoutError:
            task.add_done_callback(_retrieved)
            if self._migrating:  # the database answered
                self._opening = task
                logger.warning(
                    "PostgreSQL %s %s: still migrating the tables after %g s at open; "
                    "the migration goes on, and operations wait for it",
                    self.component,
                    self.target,
                    OPEN_TIMEOUT,
                )
                return
            task.cancel()
            await asyncio.wait([task])
            logger.warning(
                "PostgreSQL %s %s: no answer within %g s at open; trying again at the "
                "first operation",
                self.component,
                self.target,
                OPEN_TIMEOUT,
            )
        except asyncio.CancelledError:
            task.cancel()
            task.add_done_callback(_retrieved)
            raise
        except SchemaVersionError:
            raise
        except self.error_type as exc:
            if not isinstance(exc.__cause__, _DRIVER_ERRORS) or isinstance(
                exc.__cause__, asyncpg.PostgresError
            ):
                raise  # the server answered: a bad DSN, password or schema is not an outage
            logger.warning("%s; trying again at the first operation", exc)

    @asynccontextmanager
    async def errors(self, what: str) -> AsyncIterator[None]:
        """Map driver errors raised inside the block to the backend's error type."""
        lost = self._lost_releases
        try:
            yield
        except _DRIVER_ERRORS as exc:
            raise self.error(what, exc) from exc
        if lost == self._lost_releases:
            # the database answered (a release that failed meanwhile says a session
            # ended, as an outage begins): warn again at the next outage
            _POOL_LOG_FILTER.outage = False

    async def pool(self, migrations: Sequence[Migration]) -> asyncpg.Pool:
        """The pool, created (and the schema migrated) on first use."""
        if self._pool is not None:
            return self._pool
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._pool is None:
                async with self.errors("connect"):
                    pool = await asyncpg.create_pool(self.dsn, **self.pool_options)
                self._migrating = True
                try:
                    await migrate(self, pool, migrations)
                except BaseException:
                    await pool.close()
                    raise
                finally:
                    self._migrating = False
                self._pool = pool
        return self._pool

    async def absent(self, migrations: Sequence[Migration]) -> bool:
        """
        Without ``create``: whether this component's tables are missing from a schema
        that holds others' (`empty_when_missing`: its reads find nothing), looked up
        again while they are, so that a store open for long reads the tables another
        process has made since.  One round trip per read while missing, none after.
        """
        pool = await self.pool(migrations)
        if self.missing:
            self.missing = await check_tables(self, pool, len(migrations))
        return self.missing

    async def connect(self, application_name: str) -> asyncpg.Connection:
        """One connection of its own, outside the pool, opened with the pool's options
        and ``application_name`` (what ``pg_stat_activity`` shows operators)."""
        options = {k: v for k, v in self.pool_options.items() if k not in _POOL_ONLY}
        settings = {**(options.get("server_settings") or {}), "application_name": application_name}
        async with self.errors("connect"):
            return await asyncpg.connect(self.dsn, **{**options, "server_settings": settings})

    @asynccontextmanager
    async def connection(self, pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
        """A connection from ``pool`` for the block, given back by `release`."""
        conn = await pool.acquire()
        try:
            yield conn
        finally:
            await self.release(pool, conn)

    @staticmethod
    def transaction(conn: asyncpg.Connection) -> Any:
        """
        A write transaction on ``conn``, READ COMMITTED whatever the server's default
        (``default_transaction_isolation``, which a database may set to ``serializable``
        or ``repeatable read``): every write here locks the rows it changes and reads
        them after the lock is granted (`lock_row`), which only READ COMMITTED allows
        when another session changed them meanwhile; under a stricter level, concurrent
        writers of one key fail with a serialization error instead of taking turns.
        """
        return conn.transaction(isolation="read_committed")

    async def lock_row(
        self,
        conn: asyncpg.Connection,
        table: str,
        column: str,
        key: str,
        *,
        unique: str = "key",
        match: str = "key = $1",
    ) -> tuple[str | None, float]:
        """
        Inside ``conn``'s transaction, lock ``key``'s row of ``table`` (``SELECT ... FOR
        UPDATE``; inserted with ``column`` NULL when absent): its ``column`` as JSON text,
        and the server's clock read after the lock is granted (the outer query).
        ``unique`` is what the table's unique index holds (the key, or an expression of
        it) and ``match`` the condition that finds key ``$1``'s row on that index.
        Another session may delete the row between the insert (which found it there)
        and the lock (a quota store's budget reset or sweep of ended windows): the lock
        then finds no row, and the row is inserted again.
        """
        for _ in range(_LOCK_ATTEMPTS):
            await conn.execute(
                f"INSERT INTO {table} (key, {column}) VALUES ($1, NULL) "
                f"ON CONFLICT ({unique}) DO NOTHING",
                key,
            )
            row = await conn.fetchrow(
                f"SELECT locked.{column}::text AS {column}, "
                "extract(epoch FROM clock_timestamp())::float8 AS now "
                f"FROM (SELECT {column} FROM {table} WHERE {match} FOR UPDATE) AS locked",
                key,
            )
            if row is not None:
                return row[column], float(row["now"])
        raise self.error_type(
            f"PostgreSQL {self.component} {self.target}: the row of {shown(key)} was "
            f"deleted by another session each of {_LOCK_ATTEMPTS} times it was locked",
            target=self.target,
        )

    async def run(
        self,
        pool: asyncpg.Pool,
        method: Literal["execute", "fetch", "fetchrow", "fetchval"],
        query: str,
        *args: object,
    ) -> Any:
        """``connection.<method>(query, *args)`` on a connection from ``pool``, as
        ``pool.<method>`` does, given back by `release`."""
        async with self.connection(pool) as conn:
            return await getattr(conn, method)(query, *args)

    async def release(self, pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
        """
        Give ``conn`` back to ``pool``.  The release (asyncpg's reset of the session) is
        carried to its end when the caller is cancelled meanwhile, and its outcome taken.
        asyncpg's ``Pool.release`` runs the holder's release under ``asyncio.shield``;
        when the task awaiting that shield is cancelled, the shield drops its callback
        on the release, and a failure after that (a reset that gets no answer, as in a
        partition, fails at ``command_timeout``) is logged by asyncio as "Task exception
        was never retrieved".  So ``Pool.release`` runs here in a task of its own, which
        nothing cancels; the caller waits for it through a shield of its own and, when
        cancelled, leaves a done callback that takes its outcome.  A release that fails
        (the session ended: asyncpg closes the connection, the pool opens another) does
        not fail the operation, which is over.  A connection still inside a transaction
        (its commit or rollback was interrupted) is closed, not reset.
        """
        try:
            in_transaction = conn.is_in_transaction()
        except asyncpg.InterfaceError:
            return  # already back in the pool: the session ended (see `statement`)
        if in_transaction:
            conn.terminate()  # gives it back; a reset would log an "active transaction"
            return
        task = asyncio.get_running_loop().create_task(pool.release(conn))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(_retrieved)
            raise
        except Exception as exc:  # any failure: asyncpg has closed the connection
            self._lost_releases += 1
            logger.debug("PostgreSQL %s: a connection's release failed: %r", self.component, exc)

    async def clock(self, migrations: Sequence[Migration]) -> float:
        """The database's ``clock_timestamp()`` (UTC epoch seconds), one round trip."""
        pool = await self.pool(migrations)
        async with self.errors("read the clock"):
            value = await self.statement(pool, "fetchval", _NOW_SQL)
        return float(value)

    async def statement(
        self,
        pool: asyncpg.Pool,
        method: Literal["execute", "fetch", "fetchrow", "fetchval"],
        query: str,
        *args: object,
    ) -> Any:
        """
        ``connection.<method>(query, *args)`` on a connection kept between statements
        instead of taken from the pool and given back for each one: asyncpg's acquire
        and release cost more than a short statement's round trip (about 60 µs of CPU
        and 85 µs of latency on a loopback connection).  One connection is kept; a
        statement that finds it busy (another statement in flight) runs on one from the
        pool.  A statement that fails or is interrupted gives its connection back to the
        pool, whose release cleans it up, and so does the kept one every
        `KEPT_STATEMENTS` statements and when it is found closed (the server ended the
        session).  Only with a pool of at least two connections: the kept one must never
        be the one a transaction waits for.
        """
        conn = self._kept
        if conn is None or not self._keeps(pool):
            conn = await pool.acquire()
        else:
            self._kept = None
            try:
                closed = conn.is_closed()
            except asyncpg.InterfaceError:
                # the session ended and the pool has already taken the connection back
                conn = await pool.acquire()
            else:
                if closed:
                    await self.release(pool, conn)
                    conn = await pool.acquire()
        try:
            result = await getattr(conn, method)(query, *args)
        except BaseException:
            await self.release(pool, conn)
            raise
        self._kept_uses += 1
        if self._kept is None and self._kept_uses % KEPT_STATEMENTS and self._keeps(pool):
            self._kept = conn
        else:
            await self.release(pool, conn)
        return result

    def _keeps(self, pool: asyncpg.Pool) -> bool:
        """Whether `statement` keeps a connection of ``pool`` (the open one, of 2 or more)."""
        return bool(pool.get_max_size() >= 2) and pool is self._pool

    async def close(self) -> None:
        """Close the pool; past `CLOSE_TIMEOUT` seconds (an unreachable server), terminate it."""
        opening, self._opening = self._opening, None
        if opening is not None and not opening.done():
            # a migration the open left running: cut short (rolled back), its pool closed
            opening.cancel()
            await asyncio.wait([opening], timeout=CLOSE_TIMEOUT)
        pool, self._pool = self._pool, None
        if pool is None:
            return
        kept, self._kept = self._kept, None
        try:
            async with self.errors("close"):
                if kept is not None:
                    # the pool's close waits for every connection to come back
                    await asyncio.wait_for(self.release(pool, kept), CLOSE_TIMEOUT)
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except self.error_type as exc:
            if not isinstance(exc.__cause__, TimeoutError):
                raise
            logger.warning(
                "PostgreSQL %s %s: the pool did not close within %g s; terminating it",
                self.component,
                self.target,
                CLOSE_TIMEOUT,
            )
            pool.terminate()
