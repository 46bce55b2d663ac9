"""The core QuotaStore contract, run against a real PostgreSQL through its URL."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import anyio
import asyncpg
import pytest
from empathy_models_postgres import QUOTA_SCHEMA_VERSION, PostgresQuotaStore

from empathy_models import (
    Budget,
    BudgetExceededError,
    EmpathyLLMExecutor,
    ExecutionContext,
    OpenAIProvider,
    RetryPolicy,
)
from empathy_models.abc import QuotaStore
from empathy_models.backends import MemoryTelemetryBackend, state_store_from_url
from empathy_models.testing import FakeLLMServer, ModelBehavior
from empathy_models.testing.contracts import (
    QuotaStoreContract,
    ResponseCacheContract,
    StepQuotaClock,
)

WS, WE = 1_800_000_000.0, 1_800_086_400.0


def _later(data: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A budget window or a schedule as a clock ``seconds`` ahead would have written it."""
    out = dict(data)
    for name in ("at", "tat", "until"):
        if out.get(name) is not None:
            out[name] = float(out[name]) + seconds
    if "holds" in out:
        out["holds"] = {str(int(t) + int(seconds)): n for t, n in out["holds"].items()}
    if "lapses" in out:
        lapses = out["lapses"].items()
        out["lapses"] = {str(int(t) + int(seconds)): at + seconds for t, at in lapses}
    return out


class TestPostgresQuotaStore(QuotaStoreContract):
    """Each test works in its own schema of the EMPATHY_TEST_POSTGRES_DSN database."""

    @pytest.fixture
    def quota_store_url(self, postgres_url: str) -> str:
        return postgres_url

    @pytest.fixture
    def step_quota_clock(self, quota_store: QuotaStore, postgres_dsn: str) -> StepQuotaClock:
        """clock_timestamp() cannot be stepped: every time the store holds moves later."""
        assert isinstance(quota_store, PostgresQuotaStore)
        table = quota_store._table

        async def step(seconds: float) -> float:
            later = -seconds
            assert later % 60 == 0, "holds are kept per whole minute"
            conn = await asyncpg.connect(postgres_dsn)
            try:
                for row in await conn.fetch(f"SELECT key, data::text FROM {table}"):
                    moved = json.dumps(_later(json.loads(row["data"]), later))
                    await conn.execute(
                        f"UPDATE {table} SET data = $2::jsonb WHERE key = $1", row["key"], moved
                    )
            finally:
                await conn.close()
            return later

        return step


class TestPostgresResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, postgres_url: str) -> str:
        return postgres_url


def long_name(seed: int, n: int = 1_000) -> str:
    """``n`` random CJK characters (3 bytes each in UTF-8): long, and not compressible."""
    rng = random.Random(seed)
    return "".join(chr(rng.randrange(0x4E00, 0x9FFF)) for _ in range(n))


async def test_a_long_workflow_budget_holds_across_workers(postgres_url: str) -> None:
    # two workers sharing the store, a per-workflow budget that covers one call, and a
    # workflow name of 3,000 bytes: the second worker is refused, as with a short name
    def worker(server: FakeLLMServer) -> EmpathyLLMExecutor:
        return EmpathyLLMExecutor(
            [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
            telemetry_store=MemoryTelemetryBackend(),
            retry=RetryPolicy.none(),
            budgets=[Budget(limit_usd=0.001, scope="workflow")],
            quota_store=postgres_url,
        )

    ctx = ExecutionContext(workflow=long_name(1), model="gpt-4o-mini", max_tokens=1000)
    behavior = ModelBehavior(output_tokens=1000)  # about $0.0006 a call
    async with (
        FakeLLMServer(default=behavior) as server,
        worker(server) as a,
        worker(server) as b,
    ):
        response = await a.run("hello", ctx)
        assert response.cost_usd == pytest.approx(0.0006, rel=0.01)
        with pytest.raises(BudgetExceededError):
            await b.run("hello", ctx)
        assert server.requests() == 1  # the refused call reached no provider
    async with PostgresQuotaStore(postgres_url) as store:
        (usage,) = await store.usages()
    assert usage.key == f"workflow={ctx.workflow}/day"
    assert usage.spent_usd == pytest.approx(response.cost_usd)
    assert (usage.held, usage.refused) == (0, 1)


@pytest.mark.parametrize("prefix", ["empathy_", "p" * 55 + "_"], ids=["default", "long"])
async def test_version_1_quota_tables_keep_their_rows_and_take_long_keys_once_migrated(
    postgres_url: str,
    postgres_dsn: str,
    postgres_schema: str,
    prefix: str,
    with_query: Callable[..., str],
) -> None:
    # (with a prefix of 56 characters, PostgreSQL names the old primary key otherwise
    # than <table>_pkey, and shortens the new index's name)
    url = with_query(postgres_url, table_prefix=prefix)
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "amount": 6, "limit": 10}
    rate: dict[str, Any] = {"cost": 1.0, "interval": 3600.0, "burst": 1.0, "max_wait": 0.0}
    async with PostgresQuotaStore(url) as store:
        assert (await store.reserve("b", **kw)).granted
        await store.set_limit("b", 10)
        assert (await store.acquire("r", **rate)).granted
    # take the table back to what version 1 created: the whole key as its primary key
    s, table = f'"{postgres_schema}"', f'"{postgres_schema}"."{prefix}quota"'
    conn = await asyncpg.connect(postgres_dsn)
    try:
        await conn.execute(
            f'DROP INDEX {s}."{(prefix + "quota_key")[:63]}"; '
            f"ALTER TABLE {table} ADD PRIMARY KEY (key); "
            f'UPDATE {s}."{prefix}schema_version" SET version = 1 WHERE component = $$quota$$'
        )
    finally:
        await conn.close()
    # four processes' stores opening at once: one migrates, the others wait for it
    stores = [PostgresQuotaStore(url) for _ in range(4)]
    async with anyio.create_task_group() as tg:
        for store in stores:
            tg.start_soon(store.__aenter__)
    try:
        first, second = stores[:2]
        # the rows written before the migration are still the keys' rows
        refused = await first.reserve("b", **kw)
        assert not refused.granted and refused.usage.held == 6
        assert await second.limit_overrides() == {"b": 10}
        assert not (await second.acquire("r", **rate)).granted
        long_key = long_name(2)
        assert (await first.reserve(long_key, **kw)).granted
        assert not (await second.reserve(long_key, **kw)).granted
        assert [u.key for u in await second.usages()] == sorted(["b", long_key])
    finally:
        for store in stores:
            await store.aclose()
    conn = await asyncpg.connect(postgres_dsn)
    try:
        version = await conn.fetchval(
            f'SELECT version FROM {s}."{prefix}schema_version" WHERE component = $1', "quota"
        )
        keys = await conn.fetch(
            "SELECT conname FROM pg_constraint WHERE conrelid = to_regclass($1) AND contype = 'p'",
            table,
        )
    finally:
        await conn.close()
    assert version == QUOTA_SCHEMA_VERSION == 2
    assert keys == []


ODD_KEYS = ["n\x00ul", "caf\udce9", "\udce9", "n\x010ul", "\x01", "plain"]
"""Keys PostgreSQL text cannot hold as they are (a NUL, a lone surrogate), and keys
spelled like what such a key could be stored as."""


async def test_keys_with_a_nul_or_a_lone_surrogate_are_kept_apart_as_given(
    postgres_url: str,
) -> None:
    # as in MemoryQuotaStore: each key its own window, limit and schedule, read back as
    # given (a budget's name, a user id: PostgreSQL refused every operation on them)
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "limit": 100}
    rate: dict[str, Any] = {"cost": 1.0, "interval": 3600.0, "burst": 1.0, "max_wait": 0.0}
    held = {key: n for n, key in enumerate(ODD_KEYS, 1)}
    async with PostgresQuotaStore(postgres_url) as store:
        for key, n in held.items():
            assert (await store.reserve(key, amount=n, **kw)).granted
            await store.set_limit(key, n)
            assert (await store.acquire(key, **rate)).granted
        for key, n in held.items():
            assert (await store.usage(key, window_start=WS, window_end=WE)).held == n
            assert not (await store.acquire(key, **rate)).granted
        assert {u.key: u.held for u in await store.usages()} == held
        assert await store.limit_overrides() == held
        assert await store.reset_budget("n\x00ul") == 1
        await store.set_limit("caf\udce9", None)
        assert [u.key for u in await store.usages()] == sorted(set(ODD_KEYS) - {"n\x00ul"})
        assert set(await store.limit_overrides()) == set(ODD_KEYS) - {"caf\udce9"}


async def test_read_only_a_quota_table_made_after_the_open_is_read(postgres_url: str) -> None:
    # a long-running reader opened before any budget was used (its quota table missing
    # then: read as empty) kept reading nothing once the workers had made it
    async with state_store_from_url(postgres_url) as store:
        await store.reset("k")  # empathy-models tables, but no quota table
    kw: dict[str, Any] = {"window_start": WS, "window_end": WE, "amount": 2, "limit": 10}
    async with PostgresQuotaStore(postgres_url, create=False) as reader:
        assert await reader.usages() == []
        async with PostgresQuotaStore(postgres_url) as worker:
            await worker.reserve("global/day", **kw)
            await worker.set_limit("global/day", 10)
        assert [(u.key, u.held) for u in await reader.usages()] == [("global/day", 2)]
        assert await reader.limit_overrides() == {"global/day": 10}


async def test_a_sweep_of_ended_windows_skips_a_row_another_session_holds(
    postgres_url: str, postgres_dsn: str
) -> None:
    # the hourly sweep of ended budget windows runs in a budget write's transaction; it
    # waited for any ended window another session held (a late settle, another
    # process's own sweep), up to command_timeout, failing the write, and two
    # processes sweeping at once could deadlock. It now skips rows held elsewhere.
    day = 86_400.0
    async with PostgresQuotaStore(postgres_url) as first:
        now = await first.now()
        old: dict[str, Any] = {
            "window_start": now - 30 * day,
            "window_end": now - 29 * day,
            "limit": 10,
        }
        assert (await first.reserve("old", amount=1, **old)).granted
        assert (await first.reserve("older", amount=1, **old)).granted
        table = first._table
    conn = await asyncpg.connect(postgres_dsn)
    try:
        async with conn.transaction():
            # another session holds one ended window's row
            held = await conn.fetch(f"SELECT key FROM {table} WHERE key LIKE 'b|old@%' FOR UPDATE")
            assert len(held) == 1
            async with PostgresQuotaStore(postgres_url, command_timeout=60.0) as second:
                # a sweep waiting for the held row would wait the whole command_timeout
                with anyio.fail_after(20):
                    grant = await second.reserve(
                        "now", window_start=now - 60, window_end=now + day, amount=1, limit=10
                    )
                assert grant.granted
        left = await conn.fetch(f"SELECT key FROM {table} ORDER BY key")
    finally:
        await conn.close()
    # the held window stays for a later sweep; the other ended one is gone
    assert [row["key"].split("@")[0] for row in left] == ["b|now", "b|old"]


async def test_a_sweep_of_ended_windows_holds_no_budget_while_it_runs(
    postgres_url: str, postgres_dsn: str, postgres_schema: str
) -> None:
    # the hourly sweep (a scan of the whole table) ran inside the budget write that
    # started it, holding that budget's row: every other process's calls on the budget
    # (a global one: all of them) waited for the scan. The write now commits first.
    day = 86_400.0
    first, second = PostgresQuotaStore(postgres_url), PostgresQuotaStore(postgres_url)
    async with first, second:
        now = await first.now()
        today: dict[str, Any] = {"window_start": now - 60, "window_end": now + day, "limit": 10}
        await second.reserve("warm", amount=1, **today)  # its sweep for the hour: done
        ended: dict[str, Any] = {"window_start": now - 30 * day, "window_end": now - 29 * day}
        await first.reserve("old", amount=1, limit=10, **ended)
        # a sweep held up for as long as this test holds advisory lock 73215001: each row it
        # deletes first waits for that lock
        holder = await asyncpg.connect(postgres_dsn)
        try:
            await holder.execute(
                f'CREATE FUNCTION "{postgres_schema}".held() RETURNS trigger LANGUAGE plpgsql '
                "AS $$ BEGIN PERFORM pg_advisory_xact_lock(73215001); RETURN OLD; END $$; "
                f"CREATE TRIGGER held BEFORE DELETE ON {first._table} "
                f'FOR EACH ROW EXECUTE FUNCTION "{postgres_schema}".held()'
            )
            await holder.execute("SELECT pg_advisory_lock(73215001)")
            async with anyio.create_task_group() as tg:
                tg.start_soon(lambda: first.reserve("global", amount=1, **today))  # sweeps
                await _until_a_sweep_waits(holder)
                # the sweep cannot end while the lock is held: a call on the budget that
                # waited for it would never end (until command_timeout)
                with anyio.fail_after(20):
                    assert (await second.reserve("global", amount=1, **today)).granted
                await holder.execute("SELECT pg_advisory_unlock(73215001)")
        finally:
            await holder.close()


async def _until_a_sweep_waits(conn: asyncpg.Connection) -> None:
    """Until another session waits for advisory lock 73215001 (the held sweep)."""
    with anyio.fail_after(20):
        while True:
            waiting = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 73215001"
                " AND NOT granted AND database = (SELECT oid FROM pg_database"
                " WHERE datname = current_database())"
            )
            if waiting:
                return
            await anyio.sleep(0.02)
