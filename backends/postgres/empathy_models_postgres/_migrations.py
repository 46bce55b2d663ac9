"""
The tables' schema versions: the migrations' SQL filled with a `Database`'s names
(`build_migrations`), the migration a writable store's first connection runs under an
advisory lock (`migrate`), and a read-only store's check of the tables it finds
(`check_tables`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

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
    """
    version_table = db.table("schema_version")
    latest = len(migrations)
    if not db.create:
        db.missing = await check_tables(db, pool, latest)
        return
    async with (
        db.errors("migrate"),
        db.connection(pool) as conn,
        db.transaction(conn),
    ):
        # one migrator at a time for this schema and prefix, across processes
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            f"empathy_models:{db.schema}:{db.table_prefix}",
        )
        if db.schema is not None:
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote_ident(db.schema)}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {version_table} ("
            "component text PRIMARY KEY, version integer NOT NULL)"
        )
        current = await conn.fetchval(
            f"SELECT version FROM {version_table} WHERE component = $1", db.component
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
                await conn.execute(statement)
        if current < latest:
            await conn.execute(
                f"INSERT INTO {version_table} (component, version) VALUES ($1, $2) "
                "ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version",
                db.component,
                latest,
            )


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
