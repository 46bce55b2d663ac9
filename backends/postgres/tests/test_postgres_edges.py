"""PostgreSQL state store at its edges."""

from __future__ import annotations

import socket
from typing import Any

import anyio
import pytest
from empathy_models_postgres import PostgresResponseCache

from empathy_models import CircuitBreaker, ConfigurationError, Outcome, state_store_from_url
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
