"""
Sessions the server ends (``pg_terminate_backend``: a restart, a failover, an operator)
while the state store and the telemetry backend are busy and their callers' deadlines
cut operations short: asyncio has nothing to report as never retrieved, callers see
only the backends' own errors, and both work again afterwards.
"""

from __future__ import annotations

import gc
import itertools
import logging
import uuid

import anyio
import asyncpg
import pytest
from empathy_models_postgres import PostgresCircuitStateStore, PostgresTelemetryBackend
from empathy_models_postgres._feed import application_name, channel_of

from empathy_models import CircuitBreaker
from empathy_models.circuit import BreakerPolicy
from empathy_models.exceptions import BackendError
from empathy_models.records import LLMCallRecord, Outcome, OutcomeReport

POLICY = BreakerPolicy(consecutive_failures=10**9, minimum_calls=10**9)
DEADLINES = (0.002, 0.01, 0.03, 0.1, 1.0)
"""Seconds a caller gives one round of operations: some end inside a connect, a query,
a commit or a release."""
ROUNDS = 4


async def _end_sessions(dsn: str, names: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        ended = await conn.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = ANY($1::text[]) AND pid <> pg_backend_pid()) AS t",
            names,
        )
    finally:
        await conn.close()
    return int(ended)


def _call(workflow: str) -> LLMCallRecord:
    return LLMCallRecord(
        provider="p", model="m", outcome=Outcome.SUCCESS, latency_ms=12.0, workflow=workflow
    )


async def _busy(
    n: int,
    breaker: CircuitBreaker,
    store: PostgresCircuitStateStore,
    telemetry: PostgresTelemetryBackend,
    escaped: list[BaseException],
) -> None:
    """Operations of every kind, each round under one of `DEADLINES`, until cancelled."""
    for i in itertools.count():
        with anyio.move_on_after(DEADLINES[(n + i) % len(DEADLINES)]):
            try:
                async with breaker.guard(f"guarded-{i % 3}"):
                    pass
                admission = await store.admit(f"key-{i % 4}", POLICY)
                if admission.ticket is not None:
                    report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE)
                    await store.record(f"key-{i % 4}", POLICY, [report])
                await store.snapshot_all()
                await telemetry.record_many([_call("busy")])
                await telemetry.aggregate(workflow="busy")
            except BackendError:
                pass  # the database is down for a moment: the backends say so
            except Exception as exc:  # anything else escaped the backends' error mapping
                escaped.append(exc)
        await anyio.sleep(0.001)


async def test_sessions_ended_under_load_leave_nothing_unretrieved_and_the_stores_recover(
    postgres_url: str, postgres_dsn: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    name = f"empathy-ended-{uuid.uuid4().hex[:12]}"
    table = f'"{postgres_schema}"."empathy_circuit_state"'
    sessions = [name, application_name(channel_of(table))]  # the pools' and the feed's
    settings = {"application_name": name}
    store = PostgresCircuitStateStore(postgres_url, server_settings=settings)
    telemetry = PostgresTelemetryBackend(postgres_url, server_settings=settings)
    escaped: list[BaseException] = []
    async with (
        store,
        telemetry,
        CircuitBreaker(store=store, store_timeout=0.05, local_view_ttl=0) as breaker,
    ):
        ended = 0
        async with anyio.create_task_group() as tg:
            for n in range(8):
                tg.start_soon(_busy, n, breaker, store, telemetry, escaped)
            for _ in range(ROUNDS):
                await anyio.sleep(0.3)
                ended += await _end_sessions(postgres_dsn, sessions)
            await anyio.sleep(0.3)
            tg.cancel_scope.cancel()
        assert ended >= ROUNDS
        # both work again: the pools reconnect
        with anyio.fail_after(20):
            while True:
                try:
                    admission = await store.admit("after", POLICY)
                    await telemetry.record_many([_call("after")])
                    break
                except BackendError:  # a session ended last may still be read as alive
                    await anyio.sleep(0.05)
        assert admission.admitted
        assert (await store.snapshot("after")).key == "after"
        assert [p.sample_size for p in await telemetry.aggregate(workflow="after")] == [1]
    gc.collect()  # futures in reference cycles report when collected
    lost = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not lost, lost[:3]
    assert not escaped, escaped[:3]
    asyncio_errors = [
        r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR
    ]
    assert not asyncio_errors, asyncio_errors[:3]
