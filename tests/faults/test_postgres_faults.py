"""
PostgreSQL behind a `TcpProxy`: refused for seconds, partitioned, and the asyncpg
pool's log during an outage.  Every record
accepted is in the table at the end, no ``record()`` call waits on the database, and
`aclose` during a partition returns in bounded time, spooling what it could not write.
A partition that begins as a read's answer arrives, with the caller's deadline passing
while the connection goes back to the pool, leaves nothing for asyncio to report as
never retrieved.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest
from empathy_models_postgres import PostgresCircuitStateStore, PostgresTelemetryBackend

from empathy_models import CircuitBreaker
from empathy_models.backends.batching import BatchingTelemetryBackend
from empathy_models.exceptions import TelemetryError
from empathy_models.records import LLMCallRecord, Outcome

from ._load import Producer
from ._proxy import TcpProxy
from .conftest import through

OUTAGE_SECONDS = 6.0  # as in the issue
STORE_TIMEOUT = 1.0  # asyncpg connect and command timeouts in these tests


async def _count(dsn: str, schema: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}".empathy_calls'))
    finally:
        await conn.close()


def _backend(url: str, close_timeout: float = 5.0) -> BatchingTelemetryBackend:
    inner = PostgresTelemetryBackend(url, timeout=STORE_TIMEOUT, command_timeout=STORE_TIMEOUT)
    return BatchingTelemetryBackend(
        inner, max_queue=2_000, flush_interval=0.05, close_timeout=close_timeout
    )


async def _settle(backend: BatchingTelemetryBackend, produced: int, limit: float = 60.0) -> None:
    with anyio.fail_after(limit):
        while backend.written < produced or backend.pending:
            await backend.flush()
            await anyio.sleep(0.05)


@pytest.mark.slow
async def test_refused_for_seconds_loses_nothing_and_warns_once_per_outage(
    postgres_dsn: str,
    postgres_schema: str,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = through(postgres_dsn, proxy, postgres_schema)
    caplog.set_level(logging.WARNING)
    async with _backend(url) as backend:
        await backend.recent()  # connected and migrated
        load = Producer(backend, "refused")
        await load.run(1.0)
        await proxy.refuse()
        await load.run(OUTAGE_SECONDS)
        during = load.produced
        await proxy.restore()
        await load.run(1.0)
        await _settle(backend, load.produced)
        assert backend.failed == 0 and backend.dropped == 0
        assert backend.spooled > 0, "the outage outgrew the memory budget: some were spooled"
    stored = await _count(postgres_dsn, postgres_schema)
    print(
        f"\nPostgreSQL refused {OUTAGE_SECONDS:g} s: {load.produced} records accepted "
        f"({during} by the end of the outage), {stored} stored, "
        f"{load.produced - stored} lost; longest record() {load.worst * 1e3:.2f} ms"
    )
    assert stored == load.produced
    assert load.suspended == 0, "record() waited for something: it must only queue or spill"
    ours = [r.getMessage() for r in caplog.records if r.name == "empathy_models.telemetry"]
    assert sum("store is unavailable" in m for m in ours) == 1, ours
    assert sum("store is back" in m for m in ours) == 1, ours
    pool = [r for r in caplog.records if r.name == "asyncpg.pool"]
    assert len(pool) <= 1 and all(r.exc_info is None for r in pool), [r.getMessage() for r in pool]


@pytest.mark.slow
async def test_a_partition_never_stalls_a_call_and_close_is_bounded(
    postgres_dsn: str, postgres_schema: str, proxy: TcpProxy
) -> None:
    url = through(postgres_dsn, proxy, postgres_schema)
    close_timeout = 1.0
    backend = _backend(url, close_timeout=close_timeout)
    async with backend:
        await backend.recent()
        load = Producer(backend, "partition")
        await load.run(0.5)
        proxy.partition()
        await load.run(2.5)
        start = time.monotonic()
    closing = time.monotonic() - start  # aclose() during the partition
    await proxy.restore()
    async with _backend(url) as again:  # the next process (or run) replays the spool
        # until the table holds every record accepted (or 60 s): the replay's progress is
        # the subject, not its speed; a close that cut it short would spool the rest again
        with anyio.move_on_after(60):
            while await _count(postgres_dsn, postgres_schema) < load.produced:
                await again.flush()
                await anyio.sleep(0.05)
        await _settle(again, 0)
    stored = await _count(postgres_dsn, postgres_schema)
    print(
        f"\nPostgreSQL partitioned: {load.produced} records accepted, {stored} stored; "
        f"longest record() {load.worst * 1e3:.2f} ms; aclose() in the partition "
        f"{closing:.2f} s (close_timeout={close_timeout:g} s), {backend.spooled} spooled"
    )
    assert load.suspended == 0, "record() waited for something: it must only queue or spill"
    # close_timeout for the flusher, 1 s to cancel it, 5 s at most to close the pool
    assert closing < close_timeout + 1.0 + 5.0 + 1.0
    assert backend.spooled > 0
    assert stored == load.produced


async def test_a_partitioned_state_store_holds_a_call_no_longer_than_store_timeout(
    postgres_dsn: str, postgres_schema: str, proxy: TcpProxy
) -> None:
    # asyncpg gives a connection back to its pool, after a query was cancelled, only
    # once the server confirmed the cancel request (sent on a new connection): in a
    # partition that takes its command_timeout (30 s by default).  The breaker must
    # stop waiting at store_timeout and answer from its per-process fallback.
    store = PostgresCircuitStateStore(through(postgres_dsn, proxy, postgres_schema))
    now = [time.time()]

    async def ok() -> int:
        return 1

    try:
        async with CircuitBreaker(
            store, store_timeout=STORE_TIMEOUT, local_view_ttl=0.05, clock=lambda: now[0]
        ) as b:
            assert await b.call("pg:model", ok) == 1  # the store answers
            proxy.partition()
            now[0] += 1.0  # the local view expired: the next call asks the store
            start = time.monotonic()
            assert await b.call("pg:model", ok) == 1
            took = time.monotonic() - start
            assert b.degraded
            await proxy.restore()
    finally:
        await proxy.restore()
        await store.aclose()
    assert took < STORE_TIMEOUT + 3.0, f"one call took {took:.1f} s"


READS: dict[str, Callable[[PostgresTelemetryBackend], Awaitable[Any]]] = {
    "recent": lambda t: t.recent(),
    "aggregate": lambda t: t.aggregate(workflow="cut"),
    "spend": lambda t: t.spend(workflow="cut"),
    "evidence": lambda t: t.evidence(),
}


@pytest.mark.parametrize("read", sorted(READS))
async def test_a_partition_as_a_read_is_answered_leaves_nothing_unretrieved(
    read: str,
    postgres_dsn: str,
    postgres_schema: str,
    proxy: TcpProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The read's answer arrives, then the partition begins: asyncpg's release (its
    # session reset) gets no answer until command_timeout, and the caller's deadline
    # passes before that, while the connection is being given back.  asyncpg runs the
    # release under asyncio.shield, which, once its caller is cancelled, leaves the
    # release's failure to nobody: asyncio logs it as never retrieved when collected.
    # (evidence reads in a transaction: the cut follows its BEGIN, the next statement
    # gets no answer, and the interrupted transaction's connection is closed instead)
    caplog.set_level(logging.DEBUG, logger="asyncio")
    operation = READS[read]
    telemetry = PostgresTelemetryBackend(
        through(postgres_dsn, proxy, postgres_schema),
        timeout=STORE_TIMEOUT,
        command_timeout=STORE_TIMEOUT,
    )
    call = LLMCallRecord(
        provider="p", model="m", outcome=Outcome.SUCCESS, latency_ms=5.0, workflow="cut"
    )
    async with telemetry:
        await telemetry.record_many([call])
        await operation(telemetry)  # prepared: the next run is one round trip
        before = await operation(telemetry)
        assert proxy.closed == 0  # the one below is the session the partition cut
        proxy.partition_after_reply()
        with anyio.move_on_after(STORE_TIMEOUT / 4):
            await operation(telemetry)
        with anyio.fail_after(10 * STORE_TIMEOUT):
            await proxy.wait_closed()  # asyncpg gave up on the session and cut it
        gc.collect()  # futures in reference cycles report when collected
        await proxy.restore()
        with anyio.fail_after(20):  # the pool connects again once the network is back
            while True:
                try:
                    after = await operation(telemetry)
                    break
                except TelemetryError:
                    await anyio.sleep(0.05)
    gc.collect()
    lost = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not lost, lost[:3]
    assert after == before


async def test_a_migration_partitioned_from_the_server_ends_with_a_clear_error(
    postgres_dsn: str, postgres_schema: str, proxy: TcpProxy, caplog: pytest.LogCaptureFixture
) -> None:
    # a migration runs without command_timeout (an upgrade over a large table may take
    # longer: cut short there, it ran again at each operation, for ever); one whose
    # session the server no longer runs, as in a partition, still ends, saying why
    lock = f"empathy_models:{postgres_schema}:empathy_"
    other = await asyncpg.connect(postgres_dsn)  # another process, migrating
    telemetry = PostgresTelemetryBackend(
        through(postgres_dsn, proxy, postgres_schema), timeout=0.5, command_timeout=0.5
    )
    try:
        await other.execute("SELECT pg_advisory_lock(hashtext($1))", lock)
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(telemetry.__aenter__)
                await _until_waiting_for(other, lock)  # the other migration's lock
                proxy.partition()
        said = [r.getMessage() for r in caplog.records if r.name.endswith("postgres")]
        assert [m for m in said if "no longer running on the server" in m], said
        await proxy.restore()
        await other.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)
        with anyio.fail_after(10):
            assert await telemetry.recent() == []  # migrated again, once the server answers
    finally:
        await proxy.restore()
        await telemetry.aclose()
        await other.close()


async def _until_waiting_for(conn: asyncpg.Connection, lock: str) -> None:
    """Until another session waits for the advisory lock ``hashtext(lock)``."""
    while True:
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            " AND objid = (hashtext($1)::bigint & 4294967295)::oid",
            lock,
        )
        if waiting:
            return
        await anyio.sleep(0.02)
