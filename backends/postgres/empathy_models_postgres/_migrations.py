"""
The tables' schema versions: the migrations' SQL filled with a `Database`'s names
(`build_migrations`), the migration a writable store's first connection runs under an
advisory lock (`migrate`), and a read-only store's check of the tables it finds
(`check_tables`).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import re
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final

import asyncpg

from empathy_models.exceptions import ConfigurationError, SchemaVersionError

if TYPE_CHECKING:
    from ._common import Database

__all__ = [
    "NAME_BYTES",
    "Migration",
    "build_migrations",
    "check_tables",
    "migrate",
    "quote_ident",
]

_NO_LIMIT: Final = math.inf
"""A statement's ``timeout`` for no time limit (asyncpg reads ``None`` as ``command_timeout``)."""

_SESSION: Final = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
"""The migration's session on the server (the server's own: behind a pooler too)."""

_RUNNING: Final = (
    "SELECT CASE WHEN backend_start IS NULL THEN NULL ELSE backend_start = $2 AND ("
    "state = 'active' OR state_change > clock_timestamp() - make_interval(secs => $3)) END"
    " AS running FROM pg_stat_activity WHERE pid = $1"
)
"""Whether session ``$1`` begun at ``$2`` runs a statement or ran one in the last ``$3`` s
(between two statements of a migration it is idle in its transaction for a moment):
false for another session that took its pid, NULL where its state is hidden from this
role (or not tracked), no row when the session has ended."""


class MigrationSessionLost(TimeoutError):
    """A migration's session no longer running on the server (`_watched`)."""


NAME_BYTES: Final = 63
"""The most bytes of a name PostgreSQL keeps (``NAMEDATALEN - 1``): it cuts longer ones."""

Migration = Sequence[str]
"""The SQL statements that take a component from one version to the next."""


def quote_ident(name: str) -> str:
    """Quote a SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


async def migrate(db: Database, pool: asyncpg.Pool, migrations: Sequence[Migration]) -> None:
    """
    Bring ``db``'s component's tables to the latest of ``migrations`` in one transaction,
    one migrator at a time per schema and table prefix (an advisory lock); tables at a
    newer version raise `SchemaVersionError`.  Without ``db.create``, only checks them
    (`check_tables`), setting ``db.missing``.

    The migration's statements run without ``command_timeout`` and with the server's
    ``statement_timeout`` off for the transaction: an upgrade over a large table, or one
    waiting for another process's migration, may take longer, and one cut short is
    rolled back, for the next operation to run again from the start, and be cut short
    again.  `_watched` ends it instead when its session stops running on the server.
    """
    if not db.create:
        db.missing = await check_tables(db, pool, len(migrations))
        return
    async with db.errors("migrate"):
        try:
            async with db.connection(pool) as conn, db.transaction(conn):
                await _watched(db, conn, _steps(db, conn, migrations))
        except Exception as exc:
            if isinstance(exc.__context__, MigrationSessionLost):
                # the rollback on the connection closed under it failed too: say why
                raise exc.__context__ from None
            raise


async def _steps(db: Database, conn: asyncpg.Connection, migrations: Sequence[Migration]) -> None:
    """`migrate`'s statements, in ``conn``'s transaction, with no time limit."""
    version_table = db.table("schema_version")
    latest = len(migrations)
    await conn.execute("SET LOCAL statement_timeout = 0", timeout=_NO_LIMIT)
    # one migrator at a time for this schema and prefix, across processes
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        f"empathy_models:{db.schema}:{db.table_prefix}",
        timeout=_NO_LIMIT,
    )
    if db.schema is not None:
        await conn.execute(
            f"CREATE SCHEMA IF NOT EXISTS {quote_ident(db.schema)}", timeout=_NO_LIMIT
        )
    await conn.execute(
        f"CREATE TABLE IF NOT EXISTS {version_table} ("
        "component text PRIMARY KEY, version integer NOT NULL)",
        timeout=_NO_LIMIT,
    )
    current = await conn.fetchval(
        f"SELECT version FROM {version_table} WHERE component = $1",
        db.component,
        timeout=_NO_LIMIT,
    )
    current = 0 if current is None else int(current)
    if current > latest:
        raise SchemaVersionError(
            f"PostgreSQL {db.component} {db.target}: the tables "
            f"(prefix {db.table_prefix!r}, schema {db.schema or 'search_path'}) "
            f"are at schema version {current}, newer than this code's {latest}; "
            "upgrade empathy-models-postgres",
            target=db.target,
        )
    for version in range(current + 1, latest + 1):
        for statement in migrations[version - 1]:
            await conn.execute(statement, timeout=_NO_LIMIT)
    if current < latest:
        await conn.execute(
            f"INSERT INTO {version_table} (component, version) VALUES ($1, $2) "
            "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
            db.component,
            latest,
            timeout=_NO_LIMIT,
        )


async def _watched(
    db: Database, conn: asyncpg.Connection, steps: Coroutine[Any, Any, None]
) -> None:
    """
    Run ``steps`` (a migration's statements on ``conn``, with no time limit) to their
    end, while the server still runs them: every ``command_timeout`` seconds that they
    last, a connection of the watch's own asks whether ``conn``'s session is still
    running a statement, or ran one within that time.  A session the server no longer
    has (a failover, the connection lost without a word) or has left idle (an answer
    lost), or a server that does not answer the question within ``command_timeout``
    (nor a connection within the connect ``timeout``), ends the migration with a
    `MigrationSessionLost` (a ``TimeoutError``: an outage, as `Database.open` tells them) saying
    so: the connection is closed under the statement, which ends the transaction.
    With ``command_timeout=None``, or a session the server does not show, no watch.
    """
    limit = db.pool_options.get("command_timeout")
    session = await conn.fetchrow(_SESSION)
    task = asyncio.get_running_loop().create_task(steps)
    watch: asyncpg.Connection | None = None
    running = True
    try:
        while not (await asyncio.wait([task], timeout=limit))[0]:
            assert limit is not None
            if session is None:
                await asyncio.wait([task])  # nothing to watch
                break
            try:
                if watch is None or watch.is_closed():
                    watch = await db.connect("empathy-models migration watch")
                running = await _running(watch, session["pid"], session["backend_start"], limit)
            except db.error_type as exc:
                # the server refusing a connection (too many clients) answers all the
                # same; no connection within the connect timeout does not
                running = isinstance(exc.__cause__, asyncpg.PostgresError)
            if not running:
                conn.terminate()  # its statement fails; the server rolls back, if it can
                raise MigrationSessionLost(
                    f"the migration's session was no longer running on the server, or the "
                    f"server did not answer (checked after {limit:g} s, command_timeout): "
                    "abandoned, for the server to roll back"
                )
        task.result()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # taken: raised above, or superseded by the error raised
        if watch is not None and running:
            try:
                await watch.close(timeout=limit)
            except Exception:  # the server is gone: nothing to say goodbye to
                watch.terminate()
        elif watch is not None:
            watch.terminate()  # no answer: a goodbye would wait for none


async def _running(
    watch: asyncpg.Connection, pid: int, started: datetime.datetime, limit: float
) -> bool:
    """Whether session ``pid`` (begun at ``started``) runs a statement, or ran one within
    ``limit`` seconds; true when its state is hidden from this role, or the question
    fails otherwise than by going unanswered for ``limit`` seconds (false)."""
    try:
        row = await watch.fetchrow(_RUNNING, pid, started, limit, timeout=limit)
    except TimeoutError:
        return False
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        # the server answered, or ended the watch's session (the next check opens
        # another): nothing says the migration stopped
        return True
    return row is not None and row["running"] is not False


async def check_tables(db: Database, pool: asyncpg.Pool, latest: int) -> bool:
    """
    Without ``create``: refuse, rather than create, missing or outdated tables; true
    when this component's are missing from a schema that holds others' and
    ``db.empty_when_missing`` lets it read as empty.
    """
    version_table = db.table("schema_version")
    where = f"(prefix {db.table_prefix!r}, schema {db.schema or 'search_path'})"
    async with db.errors("check the tables"), db.connection(pool) as conn:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", version_table)
        current = None
        if exists:
            current = await conn.fetchval(
                f"SELECT version FROM {version_table} WHERE component = $1", db.component
            )
    if current is None and exists and db.empty_when_missing:
        return True  # empathy-models tables, but never this component's
    if current is None:
        raise db.error_type(
            f"PostgreSQL {db.component} {db.target}: no empathy-models tables {where}: "
            "nothing was recorded there (is the schema name right?); they are not "
            "created for a read-only use",
            target=db.target,
        )
    if int(current) > latest:
        raise SchemaVersionError(
            f"PostgreSQL {db.component} {db.target}: the tables {where} are at schema "
            f"version {current}, newer than this code's {latest}; upgrade "
            "empathy-models-postgres",
            target=db.target,
        )
    if int(current) < latest:
        raise db.error_type(
            f"PostgreSQL {db.component} {db.target}: the tables {where} are at schema "
            f"version {current}, older than this code's {latest}; open them once for "
            "writing (e.g. run the application) to migrate them",
            target=db.target,
        )
    return False


def _check_names(db: Database, templates: Sequence[Sequence[str]]) -> None:
    """
    Refuse a ``table_prefix`` so long that PostgreSQL, cutting names to `NAME_BYTES`,
    would make two of the component's tables and indexes one name (the second
    ``CREATE ... IF NOT EXISTS`` would find the first and create nothing).
    """
    tokens = {"schema_version"}
    for sql in (s for step in templates for s in step):
        tokens.update(re.findall(r"\{[ti]_([a-z_]+)\}", sql))
    seen: dict[bytes, str] = {}
    for token in sorted(tokens, key=lambda t: (len(t), t)):
        name = db.table_prefix + token
        cut = name.encode("utf-8")[:NAME_BYTES]
        if cut in seen:
            raise ConfigurationError(
                f"table_prefix {db.table_prefix!r} is too long: PostgreSQL cuts names to "
                f"{NAME_BYTES} bytes, which would make {seen[cut]!r} and {name!r} one "
                f"name; {NAME_BYTES - max(map(len, tokens))} characters or fewer keep "
                f"every {db.component} name whole"
            )
        seen[cut] = name


def build_migrations(db: Database, templates: Sequence[Sequence[str]]) -> list[list[str]]:
    """Fill ``{table:name}``-style placeholders: ``{t_calls}`` -> the qualified table."""
    _check_names(db, templates)
    names: dict[str, str] = {}

    def fill(sql: str) -> str:
        out = sql
        for token in re.findall(r"\{t_([a-z_]+)\}", sql):
            names[token] = db.table(token)
            out = out.replace("{t_" + token + "}", names[token])
        for token in re.findall(r"\{i_([a-z_]+)\}", sql):
            out = out.replace("{i_" + token + "}", quote_ident(db.table_prefix + token))
        return out

    return [[fill(s) for s in step] for step in templates]
