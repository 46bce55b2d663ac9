"""
Sessions of other processes holding, deleting or writing the rows a store's
transaction needs: the store's operation waits its turn and succeeds, and two stores
never deadlock each other.  Another session's row lock orders the steps (each test
waits until the store's session waits for that lock, as `pg_stat_activity` shows).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Final

import anyio
import asyncpg
from empathy_models_postgres import (
    PostgresCircuitStateStore,
    PostgresQuotaStore,
    PostgresResponseCache,
    PostgresTelemetryBackend,
)

from empathy_models import LLMCallRecord, Outcome
from empathy_models.circuit import BreakerPolicy
from empathy_models.records import CircuitState, OutcomeReport

WS, WE = 1_800_000_000.0, 1_800_086_400.0


async def _waits_for_a_row_lock(
    conn: asyncpg.Connection, application_name: str, done: anyio.Event | None = None
) -> None:
    """Wait until a session named ``application_name`` waits for a row lock (or,
    given ``done``, until it is set)."""
    with anyio.fail_after(10):
        while not (done is not None and done.is_set()) and not await conn.fetchval(  # noqa: ASYNC110  # the server signals no event
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = $1 AND wait_event_type = 'Lock'",
            application_name,
        ):
            await anyio.sleep(0.01)


async def test_a_budget_reset_by_another_process_during_a_reservation_fails_nothing(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # another process deletes the window's row (a `reset_budget`, or its hourly sweep
    # of ended windows) after this reservation found the row there and before it
    # locked it: the reservation starts the window afresh instead of failing
    name = f"quota-{postgres_schema}"
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "limit": 10}
    async with PostgresQuotaStore(
        postgres_url, server_settings={"application_name": name}
    ) as store:
        assert (await store.reserve("b", amount=6, **kw)).granted
        table = store._table
        other = await asyncpg.connect(postgres_dsn)
        try:
            # the other process's delete, held until this reservation waits for its row
            deleting = other.transaction()
            await deleting.start()
            await other.execute(f"SELECT 1 FROM {table} WHERE key LIKE 'b|b@%' FOR UPDATE")
            async with anyio.create_task_group() as tg:
                grants = []

                async def reserve() -> None:
                    grants.append(await store.reserve("b", amount=6, **kw))

                tg.start_soon(reserve)
                await _waits_for_a_row_lock(other, name)
                await other.execute(f"DELETE FROM {table} WHERE key LIKE 'b|b@%'")
                await deleting.commit()
        finally:
            await other.close()
        (grant,) = grants
        assert grant.granted and grant.usage.held == 6
        (usage,) = await store.usages()
        assert usage.held == 6


async def _set(cache: PostgresResponseCache, key: str, done: anyio.Event) -> None:
    try:
        await cache.set(key, b"new " + key.encode(), 60.0)
    finally:
        done.set()


async def test_two_caches_sweeping_as_they_refresh_expired_answers_never_deadlock(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # each cache's first write also deletes the expired rows; two processes refreshing
    # two expired answers at once, each sweeping while it holds its own answer's row,
    # wanted each other's row (the old, expired version of it)
    names = [f"cache-{i}-{postgres_schema}" for i in (1, 2)]
    async with (
        PostgresResponseCache(postgres_url, server_settings={"application_name": names[0]}) as one,
        PostgresResponseCache(postgres_url, server_settings={"application_name": names[1]}) as two,
    ):
        table = one._table
        other = await asyncpg.connect(postgres_dsn)
        try:
            # "x" first and oldest: each sweep meets it before the other expired rows
            for i, key in enumerate(["x", "a", "b"]):
                await other.execute(
                    f"INSERT INTO {table} (key, value, expires_at) "
                    "VALUES ($1, 'old', now() - make_interval(secs => $2))",
                    key,
                    float(100 - i),
                )
            # a third process holds "x" until both caches have started their sweep
            holding = other.transaction()
            await holding.start()
            await other.execute(f"SELECT 1 FROM {table} WHERE key = 'x' FOR UPDATE")
            async with anyio.create_task_group() as tg:
                for cache, key, name in ((one, "a", names[0]), (two, "b", names[1])):
                    done = anyio.Event()
                    tg.start_soon(_set, cache, key, done)
                    # its sweep waits for "x", or has passed it by
                    await _waits_for_a_row_lock(other, name, done)
                await holding.commit()
        finally:
            await other.close()
        assert (await one.get("a"), await two.get("b")) == (b"new a", b"new b")


# a database whose default isolation is stricter than READ COMMITTED (ALTER DATABASE
# ... SET default_transaction_isolation), given here per session
_SERIALIZABLE: Final = {"default_transaction_isolation": "serializable"}


async def test_a_reservation_waits_its_turn_on_a_serializable_database(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # another process writes the window's row while this reservation waits for its
    # lock: under the database's serializable default, the reservation failed with
    # "could not serialize access due to concurrent update" instead of taking its turn
    name = f"quota-{postgres_schema}"
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "limit": 10}
    async with (
        PostgresQuotaStore(
            postgres_url, server_settings={**_SERIALIZABLE, "application_name": name}
        ) as store,
        PostgresQuotaStore(postgres_url) as elsewhere,
    ):
        assert (await store.reserve("b", amount=3, **kw)).granted
        table = store._table
        other = await asyncpg.connect(postgres_dsn)
        try:
            writing = other.transaction()
            await writing.start()
            await other.execute(f"SELECT 1 FROM {table} WHERE key LIKE 'b|b@%' FOR UPDATE")
            async with anyio.create_task_group() as tg:
                grants = []

                async def reserve() -> None:
                    grants.append(await store.reserve("b", amount=3, **kw))

                tg.start_soon(reserve)
                await _waits_for_a_row_lock(other, name)
                # the other process's write: its own reservation of 2, as that store
                # would have stored it
                await other.execute(
                    f"UPDATE {table} SET data = jsonb_set(data, '{{held}}', "
                    "to_jsonb((data->>'held')::bigint + 2)) WHERE key LIKE 'b|b@%'"
                )
                await writing.commit()
        finally:
            await other.close()
        (grant,) = grants
        assert grant.granted
        assert (await elsewhere.usage("b", window_start=WS, window_end=WE)).held == 8


async def test_breakers_and_budgets_of_two_processes_take_turns_on_a_serializable_database(
    postgres_url: str,
) -> None:
    # concurrent writers of one key failed with SerializationError (most of them)
    stores = [PostgresQuotaStore(postgres_url, server_settings=_SERIALIZABLE) for _ in "ab"]
    states = [PostgresCircuitStateStore(postgres_url, server_settings=_SERIALIZABLE) for _ in "ab"]
    policy = BreakerPolicy()
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "limit": 10**6}

    async def call(state: PostgresCircuitStateStore) -> None:
        admission = await state.admit("openai:gpt", policy)
        assert admission.ticket is not None
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.SUCCESS)
        await state.record("openai:gpt", policy, [report])

    async with stores[0], stores[1], states[0], states[1]:
        async with anyio.create_task_group() as tg:
            for i in range(40):
                tg.start_soon(functools.partial(stores[i % 2].reserve, "b", amount=1, **kw))
                tg.start_soon(call, states[i % 2])
        assert (await stores[0].usage("b", window_start=WS, window_end=WE)).held == 40
        assert (await states[0].snapshot("openai:gpt")).state is CircuitState.CLOSED


async def test_two_telemetry_writers_take_turns_on_a_serializable_database(
    postgres_url: str,
) -> None:
    # each write takes the next evidence version from one counter row: concurrent
    # writers failed with SerializationError on it
    backends = [PostgresTelemetryBackend(postgres_url, server_settings=_SERIALIZABLE) for _ in "ab"]
    async with backends[0], backends[1]:
        async with anyio.create_task_group() as tg:
            for i in range(20):
                record = LLMCallRecord(provider="p", model="m", outcome=Outcome.SUCCESS)
                tg.start_soon(backends[i % 2].record_many, [record])
        (bucket,) = (await backends[0].evidence()).buckets
        assert bucket.samples == 20


async def test_processes_starting_together_on_a_serializable_database_all_open(
    postgres_url: str,
) -> None:
    # the migrations of processes starting at once take turns on an advisory lock: under
    # serializable, those that waited failed with SerializationError when they ran
    backends = [
        PostgresTelemetryBackend(postgres_url, server_settings=_SERIALIZABLE) for _ in range(4)
    ]

    async def start(backend: PostgresTelemetryBackend) -> None:
        async with backend:
            assert await backend.recent(limit=1) == []

    async with anyio.create_task_group() as tg:
        for backend in backends:
            tg.start_soon(start, backend)


async def _waits_for(
    conn: asyncpg.Connection, application_name: str, wait_event: str, done: Sequence[object]
) -> bool:
    """Wait until a session named ``application_name`` waits for a lock of that kind
    (True), or until ``done`` holds something (False)."""
    with anyio.fail_after(10):
        while not done:
            if await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                " AND wait_event_type = 'Lock' AND wait_event = $2",
                application_name,
                wait_event,
            ):
                return True
            await anyio.sleep(0.01)
    return False


async def test_a_take_racing_other_processes_takes_and_releases_never_claims_their_lease(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # other processes take the lease (committed after the take's snapshot, so it sees
    # no holder) and let it go before the take looks again, round after round: the
    # take answered "yours" after three such rounds without holding the lease, and the
    # next process's take held it too.  Now it answers only what the table holds.
    name, lname = f"lease-{postgres_schema}", f"locker-{postgres_schema}"
    async with PostgresResponseCache(
        postgres_url, server_settings={"application_name": name}
    ) as cache:
        assert await cache.release_lease("k", "nobody") is False  # the tables made
        table = cache._lease
        insert = (
            f"INSERT INTO {table} (key, holder, expires_at)"
            " VALUES ('k', $1, clock_timestamp() + interval '30 seconds')"
            " ON CONFLICT (key) DO NOTHING"
        )
        other, locker, watch = [
            await asyncpg.connect(postgres_dsn, server_settings={"application_name": n})
            for n in (f"other-{postgres_schema}", lname, f"watch-{postgres_schema}")
        ]
        answers: list[tuple[str, float] | None] = []

        async def take() -> None:
            answers.append(await cache.acquire_lease("k", "mine", 30))

        async def run(conn: asyncpg.Connection, ran: anyio.Event, *query: Any) -> None:
            await conn.execute(*query)
            ran.set()

        try:
            taking, open_take, inserted = other.transaction(), True, anyio.Event()
            await taking.start()
            await run(other, inserted, insert, "other 0")
            async with anyio.create_task_group() as tg:
                tg.start_soon(take)
                for i in range(1, 5):
                    if not await _waits_for(watch, name, "transactionid", answers):
                        break  # answered: the lease taken, or its holder seen
                    locking, locked = locker.transaction(), anyio.Event()  # the table held,
                    await locking.start()  # then the lease let go
                    tg.start_soon(run, locker, locked, f"LOCK TABLE {table}")
                    await _waits_for(watch, lname, "relation", [])
                    await inserted.wait()
                    await taking.commit()
                    open_take = False
                    if not await _waits_for(watch, name, "relation", answers):
                        await locked.wait()
                        await locking.rollback()
                        break
                    taking, open_take, inserted = other.transaction(), True, anyio.Event()
                    await taking.start()  # the next process's take, queued
                    tg.start_soon(run, other, inserted, insert, f"other {i}")
                    await _waits_for(watch, f"other-{postgres_schema}", "relation", [])
                    await locked.wait()
                    await locker.execute(f"DELETE FROM {table} WHERE key = 'k'")
                    await locking.commit()
            if open_take:  # the last process's take, landed once the table was let go
                await taking.commit()
            holder = await watch.fetchval(f"SELECT holder FROM {table} WHERE key = 'k'")
        finally:
            for conn in (other, locker, watch):
                await conn.close()
        (held,) = answers
        assert (held or ("mine",))[0] == holder, (held, holder)
