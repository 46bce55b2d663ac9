"""
A budget settlement the shared quota store failed (down for that moment, or its answer
lost on the way back) lands once the store answers again: sent again in the background
and through the executor's close, naming its hold, so one that had landed is not
counted twice; one that cannot land before its hold lapses, or before the close ends,
is counted in the limiter's ``unsettled`` and logged once.  Through the executor over
real HTTP to a `FakeLLMServer`, on a SQLite file and PostgreSQL (the Redis store's
case is in its plugin's tests).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from empathy_models import Budget, ExecutionContext
from empathy_models.abc import QuotaStore
from empathy_models.limits import BudgetUsage, SQLiteQuotaStore, quota_store_from_url
from empathy_models.testing import FakeLLMServer
from tests._fakes import CHEAP_ONLY, KEY, FailingSettle, http_executor

CTX = ExecutionContext(workflow="docs", stage="draft", max_tokens=200)
BUDGET = Budget(limit_usd=10)
Stores = Callable[[], QuotaStore]  # a new store over the same data at each call


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(
    request: pytest.FixtureRequest, tmp_path: Path, private_postgres: Callable[[], str | None]
) -> Stores:
    if request.param == "sqlite":
        return lambda: SQLiteQuotaStore(tmp_path / "quota.db")
    url = private_postgres()  # a schema of this test's own, dropped afterwards
    if url is None:
        pytest.skip("EMPATHY_TEST_POSTGRES_DSN is not set")
    return lambda: quota_store_from_url(url)


async def _usage(stores: Stores) -> BudgetUsage:
    """The budget's window, read by a store of its own."""
    async with stores() as reader:
        (usage,) = await reader.usages()
    return usage


async def _settled(stores: Stores) -> BudgetUsage:
    """The budget's window once nothing is held in it (read again until then)."""
    with anyio.move_on_after(60):
        while (usage := await _usage(stores)).held:  # noqa: ASYNC110 - the store's state
            await anyio.sleep(0.05)
    return usage


async def test_a_settlement_the_store_failed_lands_once_it_answers_again(
    server: FakeLLMServer, stores: Stores
) -> None:
    # the settlement was logged and dropped: the call's hold stayed until it lapsed (an
    # hour and more later), and then its cost was counted nowhere
    async with stores() as store:
        failing = FailingSettle(store, times=1)
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            response = await executor.run("hello", CTX)
            assert failing.failed == 1
            usage = await _settled(stores)  # in the background, before the close
            assert usage.held == 0
            assert usage.spent_usd == pytest.approx(response.cost_usd)
            limiter = executor.limiter
            assert limiter is not None
            assert limiter.unsettled == 0
    assert response.cost_usd > 0
    assert (usage.calls, usage.overrun, usage.lapsed) == (1, 0, 0)
    assert failing.calls >= 2


async def test_a_settlement_that_landed_but_whose_answer_was_lost_counts_once(
    server: FakeLLMServer, stores: Stores
) -> None:
    async with stores() as store:
        failing = FailingSettle(store, times=1, landing=True)
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            response = await executor.run("hello", CTX)
        # the close sent it again at once, and waited for it
        assert failing.calls >= 2
        assert executor.limiter is not None and executor.limiter.unsettled == 0
    usage = await _usage(stores)
    assert usage.spent_usd == pytest.approx(response.cost_usd)  # not twice
    assert (usage.held, usage.calls, usage.settled + usage.overrun) == (0, 1, usage.spent)


async def test_a_settlement_whose_hold_lapses_first_is_counted_unsettled_and_logged_once(
    server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="empathy_models.limits")
    ahead = [0.0]  # seconds the executor's wall clock is moved on

    def wall() -> float:
        return time.time() + ahead[0]

    async with SQLiteQuotaStore(tmp_path / "quota.db") as store:
        failing = FailingSettle(store, down=True)
        executor = http_executor(
            server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store, wall_clock=wall
        )
        async with executor:
            response = await executor.run("hello", CTX)
            ahead[0] = 3 * 3600.0  # past the hold's lapse (an hour and some)
            sent = failing.calls
            limiter = executor.limiter
            assert limiter is not None
            with anyio.move_on_after(60):
                while not limiter.unsettled:  # noqa: ASYNC110 - by the retry's task
                    await anyio.sleep(0.05)
            assert limiter.unsettled == 1
            assert limiter.unsettled_usd == pytest.approx(response.cost_usd)
        assert failing.calls == sent  # not sent again once its hold had lapsed
    lost = [r.getMessage() for r in caplog.records if "not counted" in r.getMessage()]
    assert len(lost) == 1
    assert "its hold lapsed first" in lost[0]
    assert f"${response.cost_usd:.6f} the call cost" in lost[0]


async def test_a_settlement_still_failing_when_the_close_ends_is_counted_unsettled(
    server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="empathy_models.limits")
    async with SQLiteQuotaStore(tmp_path / "quota.db") as store:
        failing = FailingSettle(store, down=True)
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            response = await executor.run("hello", CTX)
        limiter = executor.limiter
        assert limiter is not None
        assert limiter.unsettled == 1
        assert limiter.unsettled_usd == pytest.approx(response.cost_usd)
        assert failing.calls > 1  # tried again through the close
    lost = [r.getMessage() for r in caplog.records if "not counted" in r.getMessage()]
    assert len(lost) == 1
    assert "the limiter closed first" in lost[0]


async def test_a_store_without_hold_ids_has_a_failed_settlement_counted_at_once(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    class Unnamed(SQLiteQuotaStore):  # as a store of another package may be
        hold_ids = False

    async with Unnamed(tmp_path / "quota.db") as store:
        failing = FailingSettle(store, times=1, landing=True)
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            response = await executor.run("hello", CTX)
            limiter = executor.limiter
            assert limiter is not None
            assert limiter.unsettled == 1
            assert limiter.unsettled_usd == pytest.approx(response.cost_usd)
        # not sent again: it might have landed (as it did here), and would count twice
        assert failing.calls == 1
        (usage,) = await store.usages()
    assert usage.spent_usd == pytest.approx(response.cost_usd)


async def test_a_store_whose_settle_takes_no_hold_id_is_given_none(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    class Older(SQLiteQuotaStore):  # a subclass written before hold ids
        async def settle(  # type: ignore[override]
            self,
            key: str,
            *,
            window_start: float,
            window_end: float,
            held: int,
            actual: int,
            lapses_at: float | None = None,
        ) -> BudgetUsage:
            return await super().settle(
                key,
                window_start=window_start,
                window_end=window_end,
                held=held,
                actual=actual,
                lapses_at=lapses_at,
            )

    async with Older(tmp_path / "quota.db") as store:
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            response = await executor.run("hello", CTX)
        (usage,) = await store.usages()
    assert (usage.held, usage.calls) == (0, 1)
    assert usage.spent_usd == pytest.approx(response.cost_usd)


async def test_a_retry_that_raises_another_error_is_counted_unsettled_and_logged(
    server: FakeLLMServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="empathy_models.limits")

    async def broken(key: str, **options: object) -> BudgetUsage:
        raise ValueError("a bug in the store")

    async with SQLiteQuotaStore(tmp_path / "quota.db") as store:
        failing = FailingSettle(store, times=1)
        setattr(failing, "settle", broken)  # noqa: B010 - what the retry reaches
        executor = http_executor(server, CHEAP_ONLY, budgets=[BUDGET], quota_store=store)
        async with executor:
            await executor.run("hello", CTX)
            limiter = executor.limiter
            assert limiter is not None
            with anyio.move_on_after(60):
                while not limiter.unsettled:  # noqa: ASYNC110 - by the retry's task
                    await anyio.sleep(0.05)
            assert limiter.unsettled == 1
    lost = [r.getMessage() for r in caplog.records if "not counted" in r.getMessage()]
    assert len(lost) == 1
    assert "ValueError('a bug in the store')" in lost[0]
