"""
empathy-models-postgres: telemetry and circuit-breaker state in PostgreSQL.

Installing this package makes ``postgresql://`` and ``postgres://`` URLs work wherever
empathy-models takes a telemetry backend, a circuit-state store or a quota store
(budgets and rate limits, `PostgresQuotaStore`)::

    from empathy_models.backends import state_store_from_url, telemetry_from_url

    telemetry = telemetry_from_url("postgresql://app@db.internal/llm")
    store = state_store_from_url("postgresql://app@db.internal/llm?schema=empathy")

See `PostgresTelemetryBackend` and `PostgresCircuitStateStore`.
"""

from __future__ import annotations

import inspect
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from empathy_models.abc import TelemetryBackend
from empathy_models.backends import BackendPlugin, shown
from empathy_models.backends.batching import URL_OPTIONS, BatchingTelemetryBackend
from empathy_models.exceptions import ConfigurationError

from ._cache import (
    CACHE_SCHEMA_VERSION as CACHE_SCHEMA_VERSION,
    PostgresResponseCache as PostgresResponseCache,
)
from ._common import DEFAULT_TABLE_PREFIX as DEFAULT_TABLE_PREFIX
from ._quota import (
    QUOTA_SCHEMA_VERSION as QUOTA_SCHEMA_VERSION,
    PostgresQuotaStore as PostgresQuotaStore,
)
from ._state import (
    STATE_SCHEMA_VERSION as STATE_SCHEMA_VERSION,
    PostgresCircuitStateStore as PostgresCircuitStateStore,
)
from ._telemetry import (
    TELEMETRY_SCHEMA_VERSION as TELEMETRY_SCHEMA_VERSION,
    PostgresTelemetryBackend as PostgresTelemetryBackend,
)

__all__ = [
    "CACHE_SCHEMA_VERSION",
    "DEFAULT_TABLE_PREFIX",
    "PLUGIN",
    "QUOTA_SCHEMA_VERSION",
    "PostgresCircuitStateStore",
    "PostgresQuotaStore",
    "PostgresResponseCache",
    "PostgresTelemetryBackend",
    "STATE_SCHEMA_VERSION",
    "TELEMETRY_SCHEMA_VERSION",
]


_BATCHING: Final = frozenset(inspect.signature(BatchingTelemetryBackend).parameters) - {"inner"}
"""The options of `BatchingTelemetryBackend` (``max_queue``, ``flush_interval``...)."""


def _query_options(url: str) -> tuple[str, dict[str, Any]]:
    """
    ``url`` without the telemetry options of its query, and those options converted; a
    URL the parser refuses is returned as it is (`PostgresTelemetryBackend` says why).
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url, {}
    query = parse_qsl(parts.query, keep_blank_values=True)
    options: dict[str, Any] = {}
    for name, value in query:
        if name in URL_OPTIONS:  # batch and the batching's, as in a sqlite:// URL
            options[name] = URL_OPTIONS[name]("postgresql", name, value)
    if not options:
        return url, options
    rest = urlencode([(k, v) for k, v in query if k not in URL_OPTIONS])
    # not urlunsplit: it turns an empty host ("postgresql:///db") into "postgresql:/db"
    tail = (f"?{rest}" if rest else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{parts.netloc}{parts.path}{tail}", options


def _telemetry(url: str, **options: Any) -> TelemetryBackend:
    """
    ``telemetry_from_url("postgresql://...")``: write-behind batched by default, so the
    call path never waits on the database (``batch=False`` for direct writes).  The
    batching options (``max_batch``, ``flush_interval``, ``max_queue``, ``on_full``,
    ``spool``, ``close_timeout``, ``exit_flush``) go to `BatchingTelemetryBackend`, the
    others to `PostgresTelemetryBackend`.  ``batch`` and the batching options may also
    be given in the URL's query (``?max_queue=50000``), taken out of it before
    connecting; a keyword argument wins over the query.
    """
    url, query = _query_options(url)
    options = {**query, **options}
    batch = options.pop("batch", True)
    if not isinstance(batch, bool):
        raise ConfigurationError(f"batch must be True or False, got {shown(batch)}")
    batching = {name: options.pop(name) for name in sorted(_BATCHING & set(options))}
    if batching and not batch:
        raise ConfigurationError(
            f"the options {sorted(batching)} are for the write-behind batching, "
            "which batch=False turns off"
        )
    backend = PostgresTelemetryBackend(url, **options)
    if not batch:
        return backend
    return BatchingTelemetryBackend(backend, **batching)


def _state_store(url: str, **options: Any) -> PostgresCircuitStateStore:
    return PostgresCircuitStateStore(url, **options)


def _quota_store(url: str, **options: Any) -> PostgresQuotaStore:
    return PostgresQuotaStore(url, **options)


def _cache(url: str, **options: Any) -> PostgresResponseCache:
    return PostgresResponseCache(url, **options)


PLUGIN = BackendPlugin(
    schemes=("postgresql", "postgres"),
    package="empathy-models-postgres",
    telemetry=_telemetry,
    state_store=_state_store,
    quota_store=_quota_store,
    cache=_cache,
)
"""The entry point published under ``empathy_models.backends`` for postgresql://."""
