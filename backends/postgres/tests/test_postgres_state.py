"""PostgresCircuitStateStore specifics: database time, the table, errors."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import anyio
import asyncpg
import attrs
import pytest
from empathy_models_postgres import (
    STATE_SCHEMA_VERSION,
    PostgresCircuitStateStore,
    PostgresTelemetryBackend,
)
from empathy_models_postgres._feed import Rounds

from empathy_models.abc import ChangeFeed
from empathy_models.backends import state_store_from_url
from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import SchemaVersionError, StateStoreError
from empathy_models.records import (
    CircuitBreakerState,
    CircuitState,
    LLMCallRecord,
    Outcome,
    OutcomeReport,
)

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


async def test_a_password_with_an_unencoded_at_and_slash_is_masked_whole() -> None:
    # "app:s3cr@et/pw@host" parses as user "app", host "et": the repr still hides all of
    # the password, up to the '@' the host follows
    store = PostgresCircuitStateStore("postgresql://app:s3cr@et/pw@127.0.0.1:1/test")
    assert repr(store).startswith(
        "PostgresCircuitStateStore('postgresql://app:***@127.0.0.1:1/test'"
    )
    assert "et/pw" not in repr(store)
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


# --------------------------------------------------------------------------- the optimistic path

COUNTING = BreakerPolicy(consecutive_failures=10**9, minimum_calls=10**9)


async def _fail_once(store: PostgresCircuitStateStore, key: str) -> CircuitBreakerState:
    admission = await store.admit(key, COUNTING)
    assert admission.ticket is not None
    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
    return await store.record(key, COUNTING, [report])


async def _until_a_query_waits_for_a_lock(conn: asyncpg.Connection, marker: str) -> None:
    """Return once a query naming ``marker`` waits for a lock (within 10 s)."""
    for _ in range(1000):
        if await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE $1",
            f"%{marker}%",
        ):
            return
        await anyio.sleep(0.01)
    raise AssertionError("the store's write never waited for the row lock")


async def test_a_state_changed_before_the_write_lands_is_not_overwritten(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    table = f'"{postgres_schema}".empathy_circuit_state'
    async with PostgresCircuitStateStore(postgres_url) as store:
        before = await _fail_once(store, "k")
        other = attrs.evolve(before, consecutive_failures=before.consecutive_failures + 5)
        conn = await asyncpg.connect(postgres_dsn)
        try:
            async with conn.transaction():  # another process is changing the key
                await conn.execute(f"SELECT state FROM {table} WHERE key = 'k' FOR UPDATE")
                recording = asyncio.ensure_future(_fail_once(store, "k"))
                await _until_a_query_waits_for_a_lock(conn, postgres_schema)
                await conn.execute(
                    f"UPDATE {table} SET state = $1::jsonb WHERE key = 'k'",
                    json.dumps(other.to_dict()),
                )
            after = await asyncio.wait_for(recording, 10.0)
        finally:
            await conn.close()
        assert after.consecutive_failures == other.consecutive_failures + 1 == 7
        assert await store.snapshot("k") == after


async def test_two_pools_racing_on_one_key_lose_no_update(postgres_url: str) -> None:
    async with (
        PostgresCircuitStateStore(postgres_url) as a,
        PostgresCircuitStateStore(postgres_url) as b,
    ):

        async def fail(store: PostgresCircuitStateStore) -> None:
            for _ in range(30):
                await _fail_once(store, "k")

        async with anyio.create_task_group() as tg:
            for store in (a, b, a, b, a, b):
                tg.start_soon(fail, store)
        assert (await a.snapshot("k")).consecutive_failures == 180
        assert (await b.snapshot("k")).consecutive_failures == 180


async def test_an_admission_of_a_closed_key_is_one_statement_and_a_success_two(
    postgres_url: str,
) -> None:
    sent: list[str] = []

    async def log_queries(conn: asyncpg.Connection) -> None:
        conn.add_query_logger(lambda record: sent.append(record.query))

    async with PostgresCircuitStateStore(postgres_url, init=log_queries) as store:
        await _fail_once(store, "k")  # the row exists, the statements are prepared
        sent.clear()
        admission = await store.admit("k", COUNTING)
        assert admission.admitted and admission.ticket is not None
        assert len(sent) == 1, sent  # nothing else, not even a reset of the session
        sent.clear()
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.SUCCESS)
        state = await store.record("k", COUNTING, [report])
        assert len(sent) == 2, sent
        assert state.consecutive_failures == 0 and await store.snapshot("k") == state


async def test_a_kept_connection_the_server_ended_is_replaced(
    postgres_url: str, postgres_dsn: str
) -> None:
    name = f"empathy-kept-{id(object())}"
    async with PostgresCircuitStateStore(
        postgres_url, server_settings={"application_name": name}
    ) as store:
        await _fail_once(store, "k")  # the statements ran on the kept connection
        conn = await asyncpg.connect(postgres_dsn)
        try:
            ended = await conn.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = $1) AS t",
                name,
            )
        finally:
            await conn.close()
        assert ended >= 1
        await asyncio.sleep(0.5)  # the client reads the end of each session
        # neither a StateStoreError nor a stale answer: the store reconnects
        admission = await store.admit("k", COUNTING)
        assert admission.admitted
        assert (await store.snapshot("k")).consecutive_failures == 1


async def test_closing_a_store_after_use_does_not_wait_for_its_kept_connection(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = PostgresCircuitStateStore(postgres_url)
    async with store:
        await _fail_once(store, "k")
        await store.admit("k", COUNTING)
    # the pool's close waits for every connection it lent: one never given back would
    # hold it for the close timeout, then terminate it with a warning
    assert not [r for r in caplog.records if "did not close" in r.getMessage()]


@pytest.mark.parametrize("max_size", [1, 2])
async def test_a_small_pool_never_waits_for_the_kept_connection(
    postgres_url: str, max_size: int
) -> None:
    async with (
        asyncio.timeout(20),
        PostgresCircuitStateStore(postgres_url, min_size=1, max_size=max_size) as store,
    ):
        await _fail_once(store, "a")
        await store.admit("a", COUNTING)
        # reads of every key take a connection from the pool itself
        assert [s.key for s in await store.snapshot_all()] == ["a"]
        await store.admit("b", COUNTING)
        assert [s.key for s in await store.snapshot_all()] == ["a", "b"]


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, "off"),
        ({"server_settings": {"application_name": "empathy-test"}}, "off"),
        ({"server_settings": {"synchronous_commit": "on"}}, "on"),
    ],
)
async def test_state_writes_commit_asynchronously_unless_told_otherwise(
    postgres_url: str, options: dict[str, Any], expected: str
) -> None:
    seen: list[str] = []

    async def show(conn: asyncpg.Connection) -> None:
        seen.append(await conn.fetchval("SHOW synchronous_commit"))

    async with PostgresCircuitStateStore(postgres_url, init=show, **options) as store:
        await _fail_once(store, "k")
        assert (await store.snapshot("k")).consecutive_failures == 1
    assert seen and set(seen) == {expected}


async def test_a_store_built_not_to_listen_offers_no_feed_but_still_announces(
    postgres_url: str,
) -> None:
    quiet = PostgresCircuitStateStore(postgres_url, listen=False)
    async with quiet, state_store_from_url(postgres_url) as listening:
        assert quiet.change_feed() is None
        feed = listening.change_feed()
        assert feed is not None
        heard: list[tuple[str, int]] = []

        class Listener:
            def announced(self, key: str, generation: int) -> None:
                heard.append((key, generation))

            def restarted(self) -> None:
                pass

        listener = Listener()
        feed.listen(listener, 1.0)
        try:
            with anyio.fail_after(10):
                while not await feed.sync():  # noqa: ASYNC110  # false until subscribed
                    await anyio.sleep(0.01)
            forced = await quiet.force("k", CircuitState.FORCED_OPEN)
            assert await feed.sync()
            assert heard[-1] == ("k", forced.generation)
        finally:
            await feed.unlisten(listener)


async def test_a_sync_never_takes_a_round_trip_sent_before_it_began(postgres_dsn: str) -> None:
    # the exact mode's sync points, on the listening session: a breaker that asks while
    # a round trip is in flight waits for it and shares the next one; it never takes
    # the one in flight, sent before it asked (a change committed meanwhile, and
    # announced only before a later query's answer, would be missed)
    conn = await asyncpg.connect(postgres_dsn)
    sent: list[float] = []
    gate = asyncio.Event()

    class FirstAnswerHeld:
        async def fetchval(self, query: str) -> Any:
            sent.append(time.monotonic())
            if len(sent) == 1:
                await gate.wait()
            return await conn.fetchval(query)

        def terminate(self) -> None:
            conn.terminate()

    async def no_watcher(_feed: ChangeFeed) -> None:
        raise AssertionError("not run here")

    feed = ChangeFeed(no_watcher, "test")
    rounds = Rounds(FirstAnswerHeld(), feed, lambda: None)
    try:
        first = asyncio.create_task(rounds.sync())
        await asyncio.sleep(0.01)  # its round trip is sent, its answer held
        asked = time.monotonic()
        later = [asyncio.create_task(rounds.sync()) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert len(sent) == 1, "one round trip at a time on the session"
        gate.set()
        assert await first
        assert [await task for task in later] == [True, True]
        assert len(sent) == 2, "the two that asked later share one more round trip"
        assert asked <= feed.synced_at <= sent[1], "synced as of the later send"
    finally:
        await conn.close()


async def test_read_only_a_schema_without_breaker_state_reads_as_empty(
    postgres_url: str,
) -> None:
    # telemetry, but never a breaker, in the schema (breakers shared elsewhere): a
    # read-only store reads no state, as a SQLite file or the quota store does, rather
    # than saying the schema holds no empathy-models tables
    async with PostgresTelemetryBackend(postgres_url) as telemetry:
        await telemetry.record_many(
            [LLMCallRecord(provider="p", model="m", outcome=Outcome.SUCCESS, latency_ms=1)]
        )
    async with PostgresCircuitStateStore(postgres_url, create=False) as store:
        assert await store.snapshot_all() == []
        assert (await store.snapshot("k")).state is CircuitState.CLOSED
        await store.reset(None)  # nothing to reset
        # and once a breaker has made the table, a store open for long reads it
        async with PostgresCircuitStateStore(postgres_url) as writer:
            await writer.force("k", CircuitState.DISABLED)
        assert [s.key for s in await store.snapshot_all()] == ["k"]
        assert (await store.snapshot("k")).state is CircuitState.DISABLED
