"""PostgresCircuitStateStore specifics: database time, the table, errors."""

from __future__ import annotations

import anyio
import asyncpg
import pytest
from empathy_models_postgres import STATE_SCHEMA_VERSION, PostgresCircuitStateStore

from empathy_models.backends import state_store_from_url
from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import SchemaVersionError, StateStoreError
from empathy_models.records import CircuitState

POLICY = BreakerPolicy()


async def _db_time(dsn: str) -> float:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())::float8")
    finally:
        await conn.close()
    return float(value)


async def test_time_comes_from_the_database(postgres_url: str, postgres_dsn: str) -> None:
    store = state_store_from_url(postgres_url)
    assert isinstance(store, PostgresCircuitStateStore)
    assert store.shared
    async with store:
        before = await _db_time(postgres_dsn)
        admission = await store.admit("timed", POLICY)
        after = await _db_time(postgres_dsn)
    assert admission.state.updated_at_ts is not None
    assert before <= admission.state.updated_at_ts <= after


async def test_one_row_per_key_in_the_schema(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresCircuitStateStore(postgres_url) as store:
        await store.admit("a", POLICY)
        await store.force("b", CircuitState.DISABLED)
        assert [s.key for s in await store.snapshot_all()] == ["a", "b"]
    conn = await asyncpg.connect(postgres_dsn)
    try:
        rows = await conn.fetch(
            f'SELECT key FROM "{postgres_schema}".empathy_circuit_state ORDER BY key'
        )
        version = await conn.fetchval(
            f'SELECT version FROM "{postgres_schema}".empathy_schema_version '
            "WHERE component = 'circuit_state'"
        )
    finally:
        await conn.close()
    assert [r["key"] for r in rows] == ["a", "b"]
    assert version == STATE_SCHEMA_VERSION


async def test_a_newer_schema_is_refused(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    async with PostgresCircuitStateStore(postgres_url) as store:
        await store.admit("a", POLICY)
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            f'UPDATE "{postgres_schema}".empathy_schema_version SET version = 99 '
            "WHERE component = 'circuit_state'"
        )
    finally:
        await conn.close()
    store = PostgresCircuitStateStore(postgres_url)
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        await store.snapshot("a")
    await store.aclose()


async def test_errors_are_state_store_errors_without_the_password() -> None:
    store = PostgresCircuitStateStore("postgresql://app:s3cret-pw@127.0.0.1:1/test", timeout=2.0)
    with pytest.raises(StateStoreError) as info:
        await store.admit("k", POLICY)
    text = f"{info.value} {info.value.target} {store!r}"
    assert "s3cret-pw" not in text
    assert "127.0.0.1:1" in text
    await store.aclose()


async def test_a_unix_socket_dsn_with_plugin_options_still_connects(
    postgres_schema: str, postgres_dsn: str
) -> None:
    """``postgresql:///db?host=/run/...`` keeps its empty host once the options are removed."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        socket_dir = await conn.fetchval("SHOW unix_socket_directories")
        port = await conn.fetchval("SHOW port")
        user = await conn.fetchval("SELECT current_user")
        database = await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()
    directory = str(socket_dir).split(",")[0].strip()
    if not directory or not await anyio.Path(directory, f".s.PGSQL.{port}").exists():
        pytest.skip(f"the test server's Unix socket is not reachable here ({directory!r})")
    url = (
        f"postgresql:///{database}?host={directory}&port={port}&user={user}"
        f"&schema={postgres_schema}"
    )
    async with PostgresCircuitStateStore(url) as store:
        admission = await store.admit("via-socket", POLICY)
    assert admission.admitted


async def test_a_breaker_starts_degraded_when_its_database_is_down() -> None:
    # "a call never fails because the store is down" holds at start-up too: entering a
    # breaker that owns a PostgreSQL store (connected on entry) must not raise, as with
    # a Redis store (connected on first use)
    from empathy_models import CircuitBreaker
    from empathy_models.breaker import BreakerEvent, BreakerEventKind

    events: list[BreakerEvent] = []
    url = "postgresql://postgres@127.0.0.1:1/test?timeout=2"
    async with CircuitBreaker(store=url, listeners=[events.append]) as breaker:
        assert breaker.degraded
        async with breaker.guard("k"):
            pass
    assert [e.kind for e in events] == [BreakerEventKind.STORE_DEGRADED]
