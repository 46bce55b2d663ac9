"""PostgreSQL state store at its edges."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import anyio
import asyncpg
import pytest
from empathy_models_postgres import PostgresQuotaStore, PostgresResponseCache

from empathy_models import CircuitBreaker, ConfigurationError, Outcome, state_store_from_url
from empathy_models.exceptions import StateStoreError
from tests._cancel_trials import cancel_during_admission


async def test_a_cancel_during_a_half_open_admission_never_leaks_the_probe_lease(
    postgres_url: str,
) -> None:
    async with CircuitBreaker(store=postgres_url, local_view_ttl=0) as breaker:
        result = await cancel_during_admission(breaker, "anthropic", trials=100)
    assert result.cancelled_before_the_body >= 10
    assert result.leaked == 0
    assert result.ran_after_cancel == 0


@pytest.mark.parametrize(
    "dsn", ["postgresql://h:notaport/db", "postgresql://h:99999/db", "postgresql://[::1/db"]
)
def test_a_malformed_dsn_is_a_configuration_error(dsn: str) -> None:
    with pytest.raises(ConfigurationError, match="not a valid"):
        state_store_from_url(dsn)


async def test_leaving_the_breaker_returns_while_the_database_is_unreachable() -> None:
    # an outage at shutdown: the change feed's watcher is cancelled as its connection
    # attempt fails (Python 3.11's asyncio.wait_for then returns that failure instead
    # of the cancellation; the feed must end all the same)
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound and never listening: connections refused
        port = reserved.getsockname()[1]
        breaker = CircuitBreaker(store=f"postgresql://postgres@127.0.0.1:{port}/test")
        with anyio.fail_after(30):  # a hang guard: leaving returns at once
            async with breaker:
                ticket = await breaker.admit("openai:gpt")
                await breaker.report(ticket, Outcome.FAILURE)
                assert breaker.degraded


@pytest.mark.parametrize("field", ["max_entries", "max_value_bytes"])
@pytest.mark.parametrize(
    "bound", [0, 2**63, 10**400, 10**5000], ids=["0", "2**63", "10**400", "giant"]
)
def test_a_cache_bound_past_the_largest_is_refused(field: str, bound: int) -> None:
    # a max_entries past a bigint used to fail every write of the cache
    options: dict[str, Any] = {field: bound}
    with pytest.raises(ConfigurationError, match=rf"{field} must be an integer >= 1 and < 2\*\*63"):
        PostgresResponseCache("postgresql://postgres@127.0.0.1:5432/test", **options)


async def test_an_executor_starts_while_the_database_is_unreachable_and_runs_degraded(
    postgres_dsn: str,
) -> None:
    from empathy_models import Budget, EmpathyLLMExecutor, ExecutionContext, OpenAIProvider
    from empathy_models.testing import FakeLLMServer

    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = f"postgresql://postgres@127.0.0.1:{port}/nowhere"
    async with (
        FakeLLMServer() as server,
        EmpathyLLMExecutor(
            [OpenAIProvider(api_key="k", base_url=server.openai_base_url)],
            telemetry_store=down,
            breaker=down,
            quota_store=down,
            cache=down,
            budgets=[Budget(limit_usd=10.0, window="day")],
        ) as executor,
    ):
        ctx = ExecutionContext(model="gpt-4o-mini", temperature=0, cache_ttl=60)
        response = await executor.run("hello", ctx)
    assert response.model == "gpt-4o-mini" and not response.cached


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": 20}, r"min_size \(20\) is greater than max_size \(10\)"),
        ({"min_size": 3, "max_size": 2}, r"min_size \(3\) is greater than max_size \(2\)"),
        ({"max_size": 0}, "max_size must be an integer >= 1, got 0"),
        ({"min_size": -1}, "min_size must be an integer >= 0, got -1"),
        ({"max_size": "5"}, "max_size must be an integer >= 1, got '5'"),
        ({"min_size": 2, "init_size": 1}, r"init_size \(1\) must be from min_size to max_size"),
        ({"max_queries": 0}, "max_queries must be a number > 0, got 0"),
        ({"max_inactive_connection_lifetime": -1}, "lifetime must be a number >= 0, got -1"),
        ({"command_timeout": 0}, "command_timeout must be a number > 0, got 0"),
        ({"command_timeout": float("nan")}, "command_timeout must be a number > 0, got nan"),
        # the connect timeout: every connection failed ("timed out after 0 s"), or the
        # open with a TypeError of asyncio's ("unsupported operand type(s) for +")
        ({"timeout": 0}, r"(?<!_)timeout must be a number > 0, got 0"),
        ({"timeout": -1}, r"(?<!_)timeout must be a number > 0, got -1"),
        ({"timeout": "5"}, r"(?<!_)timeout must be a number > 0, got '5'"),
        ({"timeout": float("nan")}, r"(?<!_)timeout must be a number > 0, got nan"),
        # failed at open (or, for the breaker store, at construction with a TypeError
        # naming no option: "'str' object is not a mapping")
        ({"server_settings": "x"}, "server_settings must be a dict of str to str, got 'x'"),
        (
            {"server_settings": {"application_name": 5}},
            r"server_settings must be a dict of str to str, got \{'application_name': 5\}",
        ),
    ],
)
@pytest.mark.parametrize("kind", ["state", "quota", "cache", "telemetry"])
def test_pool_options_asyncpg_refuses_are_a_configuration_error_at_construction(
    options: dict[str, Any], message: str, kind: str
) -> None:
    # these failed at open (or at the first operation) with asyncpg's own ValueError or
    # TypeError, min_size=20 (above the default max_size) among them
    from empathy_models_postgres import (
        PostgresCircuitStateStore,
        PostgresQuotaStore,
        PostgresTelemetryBackend,
    )

    backend = {
        "state": PostgresCircuitStateStore,
        "quota": PostgresQuotaStore,
        "cache": PostgresResponseCache,
        "telemetry": PostgresTelemetryBackend,
    }[kind]
    with pytest.raises(ConfigurationError, match=message):
        backend("postgresql://postgres@127.0.0.1:5432/test", **options)


async def test_pool_sizes_asyncpg_takes_are_kept(postgres_url: str) -> None:
    options: dict[str, Any] = {"min_size": 0, "max_size": 1, "command_timeout": None}
    store = state_store_from_url(postgres_url, **options, max_queries=1.5e9)
    async with store:
        now = await store.now()
        assert now is not None and now > 0


@pytest.mark.parametrize("kind", ["state", "quota", "cache", "telemetry"])
async def test_a_dsn_with_libpq_connect_timeout_connects(postgres_url: str, kind: str) -> None:
    # asyncpg sent connect_timeout to the server as a setting, which it refused:
    # every connection failed with 'unrecognized configuration parameter'
    from empathy_models import LLMCallRecord, cache_from_url, quota_store_from_url
    from empathy_models.backends import telemetry_from_url

    url = f"{postgres_url}&connect_timeout=10"
    if kind == "telemetry":
        async with telemetry_from_url(url, batch=False) as telemetry:
            await telemetry.record(LLMCallRecord(provider="p", model="m", outcome="success"))
            assert len(await telemetry.recent(limit=5)) == 1
        return
    if kind == "cache":
        async with cache_from_url(url) as cache:
            await cache.set("k", b"v", 60)
            assert await cache.get("k") == b"v"
        return
    store = state_store_from_url(url) if kind == "state" else quota_store_from_url(url)
    async with store:
        now = await store.now()
        assert now is not None and now > 0


@contextlib.contextmanager
def _silent_port() -> Iterator[int]:
    """The port of a server that accepts connections and never answers their startup."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        yield silent.getsockname()[1]


async def test_a_dsn_connect_timeout_is_the_time_a_connection_may_take() -> None:
    with _silent_port() as port:
        url = f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=0.2"
        with pytest.raises(StateStoreError, match=r"connect failed: .*timed out after 0\.2 s"):
            async with state_store_from_url(url) as store:
                await store.now()


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_dsn_connect_timeout_that_is_no_time_is_refused(value: str) -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/test?connect_timeout={value}"
    with pytest.raises(ConfigurationError, match=f"connect_timeout .* got '{value}'"):
        state_store_from_url(url)


async def test_a_keyword_timeout_wins_over_the_dsn_connect_timeout() -> None:
    with _silent_port() as port:
        url = f"postgresql://postgres@127.0.0.1:{port}/test?connect_timeout=30"
        with pytest.raises(StateStoreError, match=r"timed out after 0\.2 s"):
            async with state_store_from_url(url, timeout=0.2) as store:
                await store.now()


@pytest.mark.parametrize(
    ("kind", "length"), [("telemetry", 55), ("cache", 50), ("quota", 58), ("state", 63)]
)
def test_a_table_prefix_whose_names_postgresql_would_cut_into_one_is_refused(
    kind: str, length: int
) -> None:
    # PostgreSQL cuts names to 63 bytes: with a 55-character prefix the telemetry's
    # "evidence_version" table became its "evidence" table, and every write failed
    from empathy_models import cache_from_url, quota_store_from_url
    from empathy_models.backends import telemetry_from_url

    factory = {
        "telemetry": telemetry_from_url,
        "cache": cache_from_url,
        "quota": quota_store_from_url,
        "state": state_store_from_url,
    }[kind]
    prefix = "p" * (length - 1) + "_"
    with pytest.raises(ConfigurationError, match=r"table_prefix .* is too long: PostgreSQL cuts"):
        factory(f"postgresql://postgres@127.0.0.1:5432/test?table_prefix={prefix}")


async def test_the_longest_table_prefix_said_to_fit_keeps_every_component_working(
    postgres_url: str,
) -> None:
    from empathy_models import LLMCallRecord, cache_from_url, quota_store_from_url
    from empathy_models.backends import telemetry_from_url

    url = f"{postgres_url}&table_prefix={'p' * 41}_"  # 42 characters
    async with telemetry_from_url(url, batch=False) as telemetry:
        await telemetry.record(LLMCallRecord(provider="p", model="m", outcome="success"))
        (bucket,) = (await telemetry.evidence()).buckets
        assert bucket.samples == 1
    async with cache_from_url(url) as cache:
        await cache.set("k", b"v", 60)
        assert await cache.get("k") == b"v"
    async with quota_store_from_url(url) as quota:
        kw: dict[str, Any] = {"window_start": 0.0, "window_end": 1e10, "limit": 10}
        assert (await quota.reserve("b", amount=3, **kw)).usage.held == 3
    async with state_store_from_url(url) as state:
        assert await state.snapshot_all() == []


@pytest.mark.parametrize("kind", ["telemetry", "cache", "quota", "state"])
def test_a_schema_name_postgresql_would_cut_is_refused(kind: str) -> None:
    # PostgreSQL cuts names to 63 bytes: two tenants' schemas named alike up to there
    # were one schema, and each read and spent the other's budgets
    from empathy_models import cache_from_url, quota_store_from_url
    from empathy_models.backends import telemetry_from_url

    factory = {
        "telemetry": telemetry_from_url,
        "cache": cache_from_url,
        "quota": quota_store_from_url,
        "state": state_store_from_url,
    }[kind]
    fits = "s" * 63
    factory(f"postgresql://postgres@127.0.0.1:5432/test?schema={fits}")
    with pytest.raises(ConfigurationError, match=rf"schema {fits}a is too long: PostgreSQL cuts"):
        factory(f"postgresql://postgres@127.0.0.1:5432/test?schema={fits}a")
    with pytest.raises(ConfigurationError, match="is too long"):
        factory("postgresql://postgres@127.0.0.1:5432/test", schema=fits + "b")


async def test_a_migration_longer_than_command_timeout_is_not_cut_short(
    postgres_url: str, postgres_dsn: str, postgres_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a migration taking longer than command_timeout (an upgrade over a large table;
    # here one waiting for another process's migration) was cut short there and rolled
    # back, and each later operation ran it again from the start, failing the same way:
    # over a table large enough, for ever. Its statements now run without that limit,
    # and without the statement_timeout the server sets for the role or database.
    other = await asyncpg.connect(postgres_dsn)
    lock = f"empathy_models:{postgres_schema}:empathy_"
    try:
        await other.execute("SELECT pg_advisory_lock(hashtext($1))", lock)

        async def finish_later() -> None:
            # once the migration's watch asked twice whether it runs: two command_timeouts
            # (a sleep from here could end before the migration even began waiting)
            with anyio.fail_after(20):
                await _until_watched_twice(other)
            await other.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)

        async with anyio.create_task_group() as tg:
            tg.start_soon(finish_later)
            async with PostgresQuotaStore(
                postgres_url, command_timeout=1.0, server_settings={"statement_timeout": "1000"}
            ) as store:
                with anyio.fail_after(20):
                    grant = await store.reserve(
                        "k", window_start=0.0, window_end=1e12, amount=1, limit=2
                    )
                assert grant.granted
    finally:
        await other.close()
    said = [r.getMessage() for r in caplog.records if r.name.endswith("postgres")]
    assert not [m for m in said if "failed" in m], said


async def _until_watched_twice(conn: asyncpg.Connection) -> None:
    """Until a migration watch's session has started two queries (its checks)."""
    started: set[object] = set()
    while len(started) < 2:
        started.update(
            row["query_start"]
            for row in await conn.fetch(
                "SELECT query_start FROM pg_stat_activity WHERE query_start IS NOT NULL"
                " AND application_name = 'empathy-models migration watch'"
                " AND datname = current_database()"
            )
        )
        await anyio.sleep(0.02)
