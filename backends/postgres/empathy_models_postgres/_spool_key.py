"""
What names a PostgreSQL telemetry store for the batching engine's spool
(`PostgresTelemetryBackend.spool_target`), so that records spooled for one database
are replayed into that database only.

The DSN as shown (`empathy_models.backends.redact_url`: its password and secret query
options masked) names the store when it says everything that picks the database and
the tables.  What else does is added as a digest of it, written nowhere as it is: the
connection options given to the pool (``host``, ``port``, ``user``, ``database``,
which asyncpg takes over the DSN's), the ``search_path`` or ``options`` server
settings (when no ``schema`` qualifies the tables), and the libpq environment
variables asyncpg reads for what neither the DSN nor the options give (``PGHOST``,
``PGPORT``, ``PGUSER``, ``PGDATABASE``, ``PGSERVICE``).  None of them holds a secret
(``PGPASSWORD`` and the password options are left out), and a password changed
keeps the store's spool.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

__all__ = ["spool_target"]

_OPTIONS: Final = ("host", "port", "user", "database")
"""asyncpg's connection options that, given, take over the DSN's (and pick the database)."""
_SETTINGS: Final = ("search_path", "options")
"""Server settings that pick the tables a name without a schema means."""
_ENVIRONMENT: Final = {
    "host": ("PGHOST",),
    "port": ("PGPORT",),
    "user": ("PGUSER",),
    "database": ("PGDATABASE",),
    "service": ("PGSERVICE",),
}
"""The environment variables asyncpg reads for each part the DSN and options leave out."""


def _given_by_dsn(shown: str) -> set[str]:
    """The parts of the connection the DSN ``shown`` (redacted) gives itself."""
    parts = urlsplit(shown)
    query = {name for name, value in parse_qsl(parts.query, keep_blank_values=True) if value}
    given = set()
    if parts.hostname or "host" in query or "hostaddr" in query:
        given.add("host")
    if parts.port is not None or "port" in query:
        given.add("port")
    if parts.username or "user" in query:
        given.add("user")
    if parts.path.strip("/") or "dbname" in query or "database" in query:
        given.add("database")
    if "service" in query:
        given.add("service")
    return given


def _beyond_the_dsn(shown: str, options: Mapping[str, Any], schema: str | None) -> dict[str, str]:
    """What picks the database and tables besides the DSN ``shown`` (see the module)."""
    beyond: dict[str, str] = {}
    for name in _OPTIONS:
        if options.get(name) is not None:
            beyond[f"option:{name}"] = repr(options[name])
    settings = options.get("server_settings") or {}
    if schema is None and isinstance(settings, Mapping):
        for name in _SETTINGS:
            if settings.get(name) is not None:
                beyond[f"setting:{name}"] = str(settings[name])
    given = _given_by_dsn(shown) | {name for name in _OPTIONS if options.get(name) is not None}
    for part, variables in _ENVIRONMENT.items():
        if part in given:
            continue
        for variable in variables:
            value = os.environ.get(variable)
            if value:
                beyond[f"env:{variable}"] = value
    return beyond


def spool_target(
    shown: str, options: Mapping[str, Any], schema: str | None, table_prefix: str
) -> tuple[str, str]:
    """
    The spool target of a telemetry store, and the one earlier versions gave it.

    Args:
        shown: The DSN, redacted (`Database.target`).
        options: The pool's options, as `asyncpg.create_pool` gets them.
        schema: The tables' schema; None for the connection's ``search_path``.
        table_prefix: The tables' prefix.

    Returns:
        ``(target, former)``: the target, which is ``former`` followed by the digest of
        what else picks the store when something does (``former`` itself otherwise),
        and ``former``, the DSN shown, the schema and the prefix alone.
    """
    former = f"postgresql:{shown}:schema={schema}:prefix={table_prefix}"
    beyond = _beyond_the_dsn(shown, options, schema)
    if not beyond:
        return former, former
    text = json.dumps(beyond, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8", "backslashreplace")).hexdigest()[:16]
    return f"{former}:connection={digest}", former
