"""
The breaker's local views stay bounded by the keys in use, through the public API.

A breaker keeps a view per key it has seen; a key left idle (a tenant gone, a model no
longer used) is forgotten once many new keys have come along, and its next call asks
the store, as one whose view expired does: its counts, trips and the states others
gave it are all there.  Views that still matter stay: a key that refuses calls, and one
whose successes are still written behind.  Each test runs on the in-process store, on
a store with local views and write-behind (the general path), and in the exact mode.
"""

from __future__ import annotations

import re

import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
)
from empathy_models._local_view import IDLE_SECONDS, SWEEP_VIEWS
from empathy_models.backends import MemoryStateStore
from empathy_models.breaker import BreakerEvent
from empathy_models.exceptions import ServerError
from empathy_models.records import CircuitBreakerState
from empathy_models.testing.clock import FakeClock

KEY = "tenant-a"
POLICY = BreakerPolicy(
    consecutive_failures=3, minimum_calls=10_000, window_seconds=3600.0, recovery_seconds=600.0
)


class _WriteBehindStore(MemoryStateStore):
    """A subclass of the memory store: the breaker takes its general path on it (local
    views, successes written behind, or in the exact mode sent by a task of its own)."""


MODES = ["memory", "write-behind", "exact"]


def make(mode: str, clock: FakeClock, store: MemoryStateStore | None = None) -> CircuitBreaker:
    if store is None:
        store = (MemoryStateStore if mode == "memory" else _WriteBehindStore)(clock=clock)
    ttl = 0.0 if mode == "exact" else 1.0
    return CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=ttl)


def views(breaker: CircuitBreaker) -> int:
    """How many keys the breaker holds a view of (its repr says)."""
    found = re.search(r"keys=(\d+)", repr(breaker))
    assert found is not None, repr(breaker)
    return int(found.group(1))


async def ok() -> int:
    return 1


async def fail() -> None:
    raise ServerError("upstream 503", status=503)


async def churn(breaker: CircuitBreaker, prefix: str, count: int) -> None:
    """One successful call for each of ``count`` new keys, their successes then flushed
    (what the background flusher of a shared store does)."""
    for i in range(count):
        assert await breaker.call(f"{prefix}-{i}", ok) == 1
    await breaker.flush()


def calls_and_failures(state: CircuitBreakerState) -> tuple[int, int]:
    return state.window_calls, state.window_failures


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.slow
async def test_views_stay_bounded_over_many_keys_each_used_once(mode: str) -> None:
    clock = FakeClock()
    days = 4
    async with make(mode, clock) as breaker:
        for day in range(days):
            await churn(breaker, f"tenant-{day}", SWEEP_VIEWS)
            clock.advance(86400)  # a day later those tenants are gone
        # the old code kept a view of every key ever seen: days * SWEEP_VIEWS
        assert views(breaker) <= 2 * SWEEP_VIEWS
        # the store still holds every key
        states = await breaker.snapshot()
        assert len(states) == days * SWEEP_VIEWS
        assert all(state.state is CircuitState.CLOSED for state in states)


@pytest.mark.parametrize("mode", MODES)
async def test_a_forgotten_key_counts_and_trips_as_before(mode: str) -> None:
    clock = FakeClock()
    events: list[tuple[str | None, CircuitState | None, CircuitState | None]] = []

    def heard(event: BreakerEvent) -> None:
        events.append((event.key, event.old_state, event.new_state))

    async with make(mode, clock) as breaker:
        breaker.add_listener(heard)
        for _ in range(4):
            await breaker.call(KEY, ok)
        for _ in range(2):
            with pytest.raises(ServerError):
                await breaker.call(KEY, fail)
        clock.advance(IDLE_SECONDS + 2)
        await churn(breaker, "other", SWEEP_VIEWS)
        assert views(breaker) <= SWEEP_VIEWS  # KEY's view is gone (the old code kept it)

        # its next call asks the store, which counted the two failures: a third trips it
        with pytest.raises(ServerError):
            await breaker.call(KEY, fail)
        with pytest.raises(CircuitOpenError):
            await breaker.call(KEY, ok)
        assert not breaker.available_hint(KEY)
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.OPEN
        assert status.generation == 1  # opened now, by the failures before and after
        assert calls_and_failures(status) == (7, 3)
        assert [e for e in events if e[0] == KEY] == [(KEY, CircuitState.CLOSED, CircuitState.OPEN)]


@pytest.mark.parametrize("mode", MODES)
async def test_a_forgotten_key_sees_a_trip_made_elsewhere(mode: str) -> None:
    clock = FakeClock()
    store = (MemoryStateStore if mode == "memory" else _WriteBehindStore)(clock=clock)
    events: list[tuple[str | None, CircuitState | None, CircuitState | None]] = []

    def heard(event: BreakerEvent) -> None:
        events.append((event.key, event.old_state, event.new_state))

    async with make(mode, clock, store) as breaker, make(mode, clock, store) as other:
        breaker.add_listener(heard)
        await breaker.call(KEY, ok)
        await breaker.flush()  # what the flusher does: a key with a batch is kept
        clock.advance(IDLE_SECONDS + 2)
        await churn(breaker, "other", SWEEP_VIEWS)
        assert views(breaker) <= SWEEP_VIEWS

        for _ in range(3):  # another worker trips it
            with pytest.raises(ServerError):
                await other.call(KEY, fail)
        with pytest.raises(CircuitOpenError) as refused:
            await breaker.call(KEY, ok)
        assert refused.value.state is CircuitState.OPEN
        assert not breaker.all_available_hint()
        assert [e for e in events if e[0] == KEY] == [(KEY, CircuitState.CLOSED, CircuitState.OPEN)]
        # and one forced open elsewhere, once its view is forgotten in turn
        await breaker.call("forced", ok)
        await breaker.flush()
        clock.advance(IDLE_SECONDS + 2)
        await churn(breaker, "more", SWEEP_VIEWS)
        await other.force_open("forced", reason="maintenance")
        with pytest.raises(CircuitOpenError) as refused:
            await breaker.call("forced", ok)
        assert refused.value.state is CircuitState.FORCED_OPEN
        assert refused.value.reason == "maintenance"


@pytest.mark.parametrize("mode", MODES)
async def test_a_guard_in_flight_counts_its_success_when_its_view_is_forgotten(
    mode: str,
) -> None:
    clock = FakeClock()
    async with make(mode, clock) as breaker:
        await breaker.call(KEY, ok)
        await breaker.flush()  # what the flusher does: a key with a batch is kept
        async with breaker.guard(KEY):
            # a long call: meanwhile the key's view grows idle and many keys come along
            clock.advance(IDLE_SECONDS + 2)
            await churn(breaker, "other", SWEEP_VIEWS)
            assert views(breaker) <= SWEEP_VIEWS  # KEY's view is gone
        status = await breaker.get_status(KEY)
        assert calls_and_failures(status) == (2, 0)
        assert status.state is CircuitState.CLOSED


@pytest.mark.parametrize("mode", MODES)
async def test_views_that_refuse_calls_or_hold_successes_are_kept(mode: str) -> None:
    clock = FakeClock()
    async with make(mode, clock) as breaker:
        for _ in range(3):
            with pytest.raises(ServerError):
                await breaker.call(KEY, fail)
        await breaker.call("batched", ok)
        await breaker.call("batched", ok)  # written behind on the general path
        clock.advance(IDLE_SECONDS + 2)
        for i in range(2 * SWEEP_VIEWS):  # no flush: every new key holds a batch
            await breaker.call(f"other-{i}", ok)
        await breaker.flush()
        await churn(breaker, "more", SWEEP_VIEWS)
        # the open key still refuses from its view, without asking the store
        assert not breaker.available_hint(KEY)
        assert not breaker.all_available_hint()
        with pytest.raises(CircuitOpenError):
            await breaker.call(KEY, ok)
        status = await breaker.get_status("batched")
        assert calls_and_failures(status) == (2, 0)
