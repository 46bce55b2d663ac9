"""
The contract's cases of keys forgotten once idle (a store's ``key_ttl``, as a Redis key
expires): a part of `CircuitStateStoreContract`, run where the subclass says how to make
its store's keys idle past their time (the ``expire_state_keys`` fixture).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest

from ...abc import CircuitStateStore
from ...breaker import CircuitBreaker
from ...circuit import BreakerPolicy
from ...records import CircuitState, Outcome, OutcomeReport

__all__ = ["ExpireStateKeys"]

ExpireStateKeys = Callable[[], Awaitable[None]]
"""
``await expire()``: every key the store holds that can be forgotten at all (not a
FORCED_OPEN key without an end, not a DISABLED key) is now idle past its time, plus
what remained of its open period: the store's clock moved that far (an injected
one), or, the clock being a server's, the keys expired as they would by then.
"""

_TRIP3 = BreakerPolicy(consecutive_failures=3, minimum_calls=1_000, window_seconds=3_600.0)


async def _report(breaker: CircuitBreaker, outcome: Outcome) -> None:
    ticket = await breaker.admit("k")
    await breaker.report(ticket, outcome, error=f"{outcome.value} (contract)")


async def _fail(store: CircuitStateStore, key: str, policy: BreakerPolicy, times: int) -> None:
    for _ in range(times):
        admission = await store.admit(key, policy)
        assert admission.admitted and admission.ticket is not None, admission
        report = OutcomeReport(ticket=admission.ticket, outcome=Outcome.FAILURE, error="503")
        await store.record(key, policy, [report])


class StateKeyExpiry:
    """Keys idle past their time, for `CircuitStateStoreContract`."""

    def _needs_state(self) -> None:
        """Skip a store that keeps no state (`CircuitStateStoreContract` overrides it)."""

    @pytest.fixture
    def expire_state_keys(self) -> ExpireStateKeys | None:
        """
        How to make the store's keys idle past their time (`ExpireStateKeys`); ``None``
        (the default) skips these tests, as for a store that keeps every key.
        """
        return None

    def _expirer(self, expire: ExpireStateKeys | None) -> ExpireStateKeys:
        self._needs_state()
        if expire is None:
            pytest.skip(f"{type(self).__name__} does not override 'expire_state_keys'")
        return expire

    async def test_a_key_idle_past_its_time_reads_and_counts_as_a_new_key(
        self, state_store: CircuitStateStore, expire_state_keys: ExpireStateKeys | None
    ) -> None:
        expire = self._expirer(expire_state_keys)
        await _fail(state_store, "read", _TRIP3, 2)
        await _fail(state_store, "written", _TRIP3, 2)
        await _fail(state_store, "listed", _TRIP3, 2)
        await state_store.force("held", CircuitState.FORCED_OPEN, reason="until told")
        await expire()
        fresh = await state_store.snapshot("read")
        assert fresh.state is CircuitState.CLOSED and fresh.generation == 0, fresh
        assert fresh.consecutive_failures == 0 and fresh.failure_count == 0, fresh
        # its two old failures no longer count: one more does not trip it
        await _fail(state_store, "written", _TRIP3, 1)
        state = await state_store.snapshot("written")
        assert state.state is CircuitState.CLOSED and state.consecutive_failures == 1, state
        listed = {state.key for state in await state_store.snapshot_all()}
        assert "listed" not in listed and "held" in listed, listed

    async def test_a_breaker_counts_a_key_idle_past_its_time_afresh(
        self, state_store: CircuitStateStore, expire_state_keys: ExpireStateKeys | None
    ) -> None:
        expire = self._expirer(expire_state_keys)
        async with CircuitBreaker(state_store, _TRIP3) as breaker:
            for _ in range(2):
                await _report(breaker, Outcome.FAILURE)
            await expire()
            await _report(breaker, Outcome.FAILURE)
            state = await breaker.get_status("k")
            assert state.state is CircuitState.CLOSED and state.consecutive_failures == 1, state
            for _ in range(2):  # every failure after the idle time counts
                await _report(breaker, Outcome.FAILURE)
            state = await breaker.get_status("k")
            assert state.state is CircuitState.OPEN, state
