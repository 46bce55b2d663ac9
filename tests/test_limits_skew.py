"""
Budgets on a shared quota store (SQLite, Redis, PostgreSQL), used by a worker whose clock
is an hour off the store's: its holds must last as long as its calls may run by the
store's clock (it lapses them), so that another worker cannot spend what they hold.
Redis and PostgreSQL run when ``EMPATHY_TEST_REDIS_URL`` / ``EMPATHY_TEST_POSTGRES_DSN``
name a server (a namespace of its own, dropped afterwards).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from empathy_models import (
    Budget,
    BudgetExceededError,
    EmpathyLLMExecutor,
    ExecutionContext,
    OpenAIProvider,
    RetryPolicy,
)
from empathy_models.backends import NullTelemetryBackend
from empathy_models.limits import BudgetUsage, quota_store_from_url
from empathy_models.testing import FakeLLMServer, ModelBehavior
from tests._namespaces import quota_url_of
from tests._workers.limits_worker import KEY, MAX_TOKENS, MODEL, PROMPT, REGISTRY

HOUR = 3600.0


@pytest.fixture(params=["sqlite", "redis", "postgresql"])
def quota_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with quota_url_of(request.param, tmp_path) as url:
        yield url


def _executor(server: FakeLLMServer, quota_url: str, offset: float) -> EmpathyLLMExecutor:
    return EmpathyLLMExecutor(
        [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
        registry=REGISTRY,
        telemetry_store=NullTelemetryBackend(),
        budgets=[Budget(limit_usd=1.0)],
        quota_store=quota_url,
        retry=RetryPolicy.none(),
        wall_clock=lambda: time.time() + offset,
    )


@pytest.mark.parametrize("offset", [-HOUR, HOUR], ids=["an-hour-behind", "an-hour-ahead"])
async def test_a_worker_whose_clock_is_off_holds_its_budget_by_the_servers_clock(
    quota_url: str, offset: float
) -> None:
    context = ExecutionContext(workflow="w", stage="s", model=MODEL, max_tokens=MAX_TOKENS)
    async with (
        FakeLLMServer(api_key=KEY) as server,
        quota_store_from_url(quota_url) as store,
        _executor(server, quota_url, offset) as skewed,
        _executor(server, quota_url, 0.0) as punctual,
    ):
        server.set_behavior(MODEL, ModelBehavior(latency=1500.0))  # a call in flight
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(skewed.run, PROMPT, context)
            with anyio.fail_after(10):
                # the hold is in the store, written by another executor: polled
                while not (usages := await store.usages()) or usages[0].held == 0:  # noqa: ASYNC110
                    await anyio.sleep(0.02)
            (usage,) = usages
            server_now = await store.now()
            assert server_now is not None
            # the hold lapses when the call may have ended by the server's clock: its
            # timeout, the longest rate-limit wait (30 s) and the grace to settle it
            # (120 s), rounded up to a minute; not an hour early or late
            assert usage.held_until is not None and context.timeout is not None
            lease = context.timeout + 30.0 + 120.0
            lapses_in = usage.held_until - server_now
            assert lease - 5.0 < lapses_in <= lease + 65.0, lapses_in
            # the window is the server's day too
            assert usage.window_start <= server_now < usage.window_end
            # room for one more call's hold, not two: the punctual worker is refused
            # while the skewed one's call runs
            await store.set_limit(usage.key, usage.held * 3 // 2)
            with pytest.raises(BudgetExceededError, match="cannot cover the call"):
                await punctual.run(PROMPT, context)
    (after,) = await _usages(quota_url)
    assert after.held == 0 and after.spent > 0  # the skewed call settled its own hold


async def _usages(quota_url: str) -> list[BudgetUsage]:
    async with quota_store_from_url(quota_url) as store:
        return list(await store.usages())


async def test_a_store_whose_clock_cannot_be_read_still_holds_budgets(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from empathy_models.exceptions import StateStoreError
    from empathy_models.limits.sqlite import SQLiteQuotaStore

    class Unclocked(SQLiteQuotaStore):
        reads = 0

        async def now(self) -> float | None:
            Unclocked.reads += 1
            raise StateStoreError("the clock is unreadable", target="test")

    context = ExecutionContext(workflow="w", stage="s", model=MODEL, max_tokens=MAX_TOKENS)
    store = Unclocked(tmp_path / "quota.db")
    caplog.set_level("DEBUG", logger="empathy_models.limits")
    async with FakeLLMServer(api_key=KEY) as server, store:
        executor = EmpathyLLMExecutor(
            [OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)],
            registry=REGISTRY,
            telemetry_store=NullTelemetryBackend(),
            budgets=[Budget(limit_usd=1.0)],
            quota_store=store,
            retry=RetryPolicy.none(),
        )
        async with executor:
            for _ in range(3):
                await executor.run(PROMPT, context)
    async with SQLiteQuotaStore(tmp_path / "quota.db") as reader:
        (usage,) = await reader.usages()
    assert usage.calls == 3 and usage.held == 0 and usage.spent > 0
    assert Unclocked.reads == 1  # tried once, then not again within the minute
    assert "reading the quota store's clock failed" in caplog.text
