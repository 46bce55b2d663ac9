"""
The exact mode (``local_view_ttl=0``) on a store doing I/O: every admission asks the
store; a success of a CLOSED ticket is sent right after the call, off its path, and the
key's next store operation in this process waits for it, so the store sees this
process's outcomes in their order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState
from empathy_models.backends import MemoryStateStore
from empathy_models.circuit import BreakerPolicy as Policy
from empathy_models.exceptions import ServerError
from empathy_models.records import CircuitBreakerState, Outcome, OutcomeReport
from empathy_models.testing.clock import FakeClock

KEY = "anthropic"
POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=100)


class HeldStore(MemoryStateStore):
    """A memory store that behaves like a network store: its `record` waits for ``gate``
    (open unless a test closes it) and each batch it applies is logged in order."""

    shared = True

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.gate = asyncio.Event()
        self.gate.set()
        self.batches: list[list[Outcome]] = []

    @property
    def in_process(self) -> bool:
        return False

    async def record(
        self, key: str, policy: Policy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        await self.gate.wait()
        self.batches.append([report.outcome for report in reports])
        return await super().record(key, policy, reports)


async def _succeed(breaker: CircuitBreaker) -> None:
    async with breaker.guard(KEY):
        pass


async def _fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(ServerError):
        async with breaker.guard(KEY):
            raise ServerError("boom", status=503)


async def test_a_success_does_not_wait_for_the_store_and_lands_before_a_later_failure() -> None:
    clock = FakeClock()
    store = HeldStore(clock)
    async with CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0) as breaker:
        await _fail(breaker)
        await _fail(breaker)  # two consecutive failures in the store
        store.gate.clear()  # the store stops answering records
        # the guarded call returns although its success has not reached the store
        await asyncio.wait_for(_succeed(breaker), timeout=5)
        await asyncio.wait_for(_succeed(breaker), timeout=5)
        assert (await store.snapshot(KEY)).consecutive_failures == 2
        # a failure now waits for those successes: the store sees S, S, F (one
        # consecutive failure), not F, S, S
        failing = asyncio.create_task(_fail(breaker))
        await asyncio.sleep(0.05)
        assert not failing.done()
        store.gate.set()
        await asyncio.wait_for(failing, timeout=5)
        state = await store.snapshot(KEY)
        assert state.state is CircuitState.CLOSED
        assert state.consecutive_failures == 1
        assert state.window_calls == 5
        flat = [outcome for batch in store.batches for outcome in batch]
        assert flat == [Outcome.FAILURE] * 2 + [Outcome.SUCCESS] * 2 + [Outcome.FAILURE]


async def test_aclose_and_get_status_wait_for_the_successes_in_flight() -> None:
    clock = FakeClock()
    store = HeldStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0)
    async with breaker:
        await _succeed(breaker)
        assert (await breaker.get_status(KEY)).window_calls == 1  # waited for it
        store.gate.clear()
        await _succeed(breaker)
        closing = asyncio.create_task(breaker.aclose())
        await asyncio.sleep(0.05)
        assert not closing.done()  # aclose waits for the success still held by the store
        store.gate.set()
        await asyncio.wait_for(closing, timeout=5)
    assert (await store.snapshot(KEY)).window_calls == 2


async def test_successes_arriving_while_one_is_in_flight_follow_it() -> None:
    clock = FakeClock()
    store = HeldStore(clock)
    async with CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0) as breaker:
        store.gate.clear()
        for _ in range(10):
            await _succeed(breaker)
        store.gate.set()
        await breaker.flush()
        assert (await store.snapshot(KEY)).window_calls == 10
        # nothing lost, and the nine that waited went together
        assert sum(len(batch) for batch in store.batches) == 10
        assert len(store.batches) <= 3


async def test_every_admission_asks_the_store_and_sqlite_holds_every_success(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    policy = BreakerPolicy(consecutive_failures=2, minimum_calls=100)
    async with (
        CircuitBreaker(url, policy, local_view_ttl=0) as a,
        CircuitBreaker(url, policy, local_view_ttl=0) as b,
    ):
        for _ in range(20):
            await _succeed(a)
        await _fail(b)
        await _fail(b)  # b trips the key
        with pytest.raises(CircuitOpenError):
            await a.admit(KEY)  # a sees it at its very next admission
        state = await a.get_status(KEY)
        assert state.state is CircuitState.OPEN
        assert state.generation == 1
    async with CircuitBreaker(url, policy, local_view_ttl=0) as c:
        await c.reset(KEY)
        for _ in range(7):
            await _succeed(c)
    async with CircuitBreaker(url, policy, local_view_ttl=0) as d:
        assert (await d.get_status(KEY)).window_calls == 7
