"""
`CircuitStateStoreContract`: the behaviour every `CircuitStateStore` owes (admission,
tripping, generations, recovery and probes, manual control, isolation, concurrency).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar

import anyio
import attrs
import pytest
import pytest_asyncio

from ...abc import CircuitStateStore
from ...backends import state_store_from_url
from ...breaker import CircuitBreaker
from ...circuit import BreakerPolicy
from ...exceptions import (
    BackendClosedError,
    BackendError,
    CircuitOpenError,
    ConfigurationError,
    RecordValidationError,
)
from ...records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    Outcome,
    OutcomeReport,
    Ticket,
)
from ._base import _fail_override
from ._clock_step import StateClockSteps
from ._idle_keys import StateKeyExpiry

__all__ = ["AdvanceClock", "CircuitStateStoreContract"]

AdvanceClock = Callable[[float], Awaitable[None]]
"""``await advance(seconds)``: let the store's clock move forward by at least ``seconds``."""

#: Trips after 3 consecutive failures; the failure-rate rule is out of reach.
_TRIP3 = BreakerPolicy(
    consecutive_failures=3,
    minimum_calls=1_000,
    recovery_seconds=0.2,
    max_recovery_seconds=0.2,
    probe_lease_seconds=30.0,
    window_seconds=3_600.0,
)


def _policy(**changes: Any) -> BreakerPolicy:
    return attrs.evolve(_TRIP3, **changes)


def _report(ticket: Ticket | None, outcome: Outcome = Outcome.FAILURE) -> OutcomeReport:
    assert ticket is not None, "an admitted call must carry a ticket"
    return OutcomeReport(ticket=ticket, outcome=outcome, error=f"{outcome.value} (contract)")


async def _admitted(store: CircuitStateStore, key: str, policy: BreakerPolicy) -> Ticket:
    admission = await store.admit(key, policy)
    assert admission.admitted, f"{key!r} should admit, got {admission.state.state.value}"
    assert admission.ticket is not None
    return admission.ticket


async def _fail(
    store: CircuitStateStore, key: str, policy: BreakerPolicy, times: int
) -> CircuitBreakerState:
    state = await store.snapshot(key)
    for _ in range(times):
        ticket = await _admitted(store, key, policy)
        state = await store.record(key, policy, [_report(ticket)])
    return state


async def _wait_for_probe(
    store: CircuitStateStore,
    key: str,
    policy: BreakerPolicy,
    rejected: Admission,
    advance: AdvanceClock,
) -> Ticket:
    """Let the open time pass, then take the first half-open probe (bounded polling)."""
    admission = rejected
    for _ in range(20):
        assert not admission.admitted
        assert admission.retry_after is not None, "an OPEN circuit must say when to retry"
        await advance(admission.retry_after + 0.02)
        admission = await store.admit(key, policy)
        if admission.admitted:
            assert admission.ticket is not None
            return admission.ticket
    raise AssertionError(f"{key!r} never admitted a probe; last state {admission.state}")


class StateStoreFixtures:
    """The fixtures every state-store contract takes: the store's URL and options."""

    @pytest.fixture
    def state_store_url(self) -> str:
        """The URL of an empty store; subclasses must override this fixture."""
        _fail_override(type(self), "state_store_url")

    @pytest.fixture
    def state_store_options(self) -> dict[str, Any]:
        """Keyword options passed to `state_store_from_url`; none by default."""
        return {}


class _KeyChecks:
    """The keys no store can hold (a part of `CircuitStateStoreContract`)."""

    def _needs_state(self) -> None:
        """Skip a store that keeps no state (`CircuitStateStoreContract` overrides it)."""

    async def test_a_key_no_store_can_hold_is_refused_and_degrades_nothing(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        refused: list[Any] = [None, 42, ["openai"], "", "k" * 501, "openai:a\x00b", "m-\udcff"]
        async with CircuitBreaker(state_store, _TRIP3) as breaker:
            for key in refused:
                ticket = Ticket(key=key, generation=0)
                calls: list[tuple[Callable[..., Awaitable[object]], tuple[Any, ...]]] = [
                    (breaker.admit, (key,)),
                    (breaker.call, (key, anyio.sleep, 0)),
                    (breaker.report, (ticket, Outcome.FAILURE)),
                    (breaker.get_status, (key,)),
                    (breaker.is_available, (key,)),
                    (breaker.force_open, (key,)),
                    (breaker.disable, (key,)),
                ]
                if key is not None:  # reset(None) resets every key
                    calls.append((breaker.reset, (key,)))
                for method, args in calls:
                    with pytest.raises(ConfigurationError, match="must"):
                        await method(*args)
                    assert not breaker.degraded, (method.__name__, key)
                with pytest.raises(ConfigurationError):
                    async with breaker.guard(key):
                        pass
                with pytest.raises(ConfigurationError):
                    breaker.protect(key)
                with pytest.raises(ConfigurationError):
                    breaker.available_hint(key)
            # the store still answers for every other key
            await breaker.force_open("openai", reason="still shared")
        assert (await state_store.snapshot("openai")).state is CircuitState.FORCED_OPEN
        assert [s.key for s in await state_store.snapshot_all()] == ["openai"]

    async def test_a_key_no_store_can_hold_is_refused_by_the_store_itself(
        self, state_store: CircuitStateStore
    ) -> None:
        # used without a breaker (the CLI's `breaker open`), the store says the same
        refused: list[Any] = [None, 42, ["k"], "", "k" * 501, "openai:a\x00b", "m-\udcff"]
        report = _report(Ticket(key="k", generation=0), Outcome.SUCCESS)
        for key in refused:
            calls: list[tuple[Callable[..., Awaitable[object]], tuple[Any, ...]]] = [
                (state_store.admit, (key, _TRIP3)),
                (state_store.record, (key, _TRIP3, [report])),
                (state_store.force, (key, CircuitState.FORCED_OPEN)),
                (state_store.snapshot, (key,)),
            ]
            if key is not None:  # reset(None) resets every key
                calls.append((state_store.reset, (key,)))
            for method, args in calls:
                with pytest.raises(ConfigurationError, match="must"):
                    await method(*args)
        assert await state_store.snapshot_all() == []


@pytest.mark.asyncio
class _OpenTimes:
    """
    How long a circuit stays open, on the store's clock (a part of
    `CircuitStateStoreContract`): a 429's Retry-After, a forced span, the provider rule.
    """

    def _needs_state(self) -> None:
        """Skip a store that keeps no state (`CircuitStateStoreContract` overrides it)."""

    async def test_a_429_opens_for_exactly_its_retry_after_and_is_not_a_trip(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        policy = _policy(recovery_seconds=60.0, max_recovery_seconds=600.0)
        policy = attrs.evolve(policy, min_retry_after_open=0.2)

        def limited(ticket: Ticket, retry_after: float) -> OutcomeReport:
            return OutcomeReport(
                ticket=ticket, outcome=Outcome.RATE_LIMITED, retry_after=retry_after, error="429"
            )

        for _ in range(3):  # each 429 after a closing probe: the same short open time
            ticket = await _admitted(state_store, "k", policy)
            held = await state_store.record("k", policy, [limited(ticket, 0.3)])
            assert held.state is CircuitState.OPEN and held.open_count == 0, held
            assert held.opened_at_ts is not None and held.open_until_ts is not None
            assert held.open_until_ts - held.opened_at_ts == pytest.approx(0.3), held
            rejected = await state_store.admit("k", policy)
            assert rejected.retry_after is not None and 0 < rejected.retry_after <= 0.3 + 1e-6
            probe = await _wait_for_probe(state_store, "k", policy, rejected, advance_clock)
            # a probe's 429 re-opens for its Retry-After too, still without a trip
            reheld = await state_store.record("k", policy, [limited(probe, 0.3)])
            assert reheld.state is CircuitState.OPEN and reheld.open_count == 0, reheld
            assert reheld.open_until_ts is not None and reheld.opened_at_ts is not None
            assert reheld.open_until_ts - reheld.opened_at_ts == pytest.approx(0.3), reheld
            probe = await _wait_for_probe(
                state_store, "k", policy, await state_store.admit("k", policy), advance_clock
            )
            closed = await state_store.record("k", policy, [_report(probe, Outcome.SUCCESS)])
            assert closed.state is CircuitState.CLOSED

        # a streak trip by the same 429 is a trip: the longer of the two open times
        early = await _admitted(state_store, "streak", policy)
        await _fail(state_store, "streak", policy, 2)
        tripped = await state_store.record(
            "streak", policy, [limited(await _admitted(state_store, "streak", policy), 0.3)]
        )
        assert tripped.state is CircuitState.OPEN and tripped.open_count == 1, tripped
        assert tripped.open_until_ts is not None and tripped.opened_at_ts is not None
        assert tripped.open_until_ts - tripped.opened_at_ts == pytest.approx(60.0), tripped
        # a shorter 429 reported late never shortens the open period
        late = await state_store.record("streak", policy, [limited(early, 0.3)])
        assert late.open_until_ts == pytest.approx(tripped.open_until_ts), late

    async def test_forced_open_for_seconds_counts_from_the_store_clock(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        timed = await state_store.force("k", CircuitState.FORCED_OPEN, for_seconds=0.2)
        assert timed.state is CircuitState.FORCED_OPEN
        assert timed.open_until_ts is not None and timed.updated_at_ts is not None
        assert timed.open_until_ts - timed.updated_at_ts == pytest.approx(0.2), timed
        # never shortened: a shorter span keeps the end, a longer one moves it later
        same = await state_store.force("k", CircuitState.FORCED_OPEN, for_seconds=0.0)
        assert same.open_until_ts == pytest.approx(timed.open_until_ts)
        rejected = await state_store.admit("k", _TRIP3)
        assert not rejected.admitted and rejected.retry_after is not None
        assert 0 < rejected.retry_after <= 0.2 + 1e-6
        probe = await _wait_for_probe(state_store, "k", _TRIP3, rejected, advance_clock)
        assert probe.lease_id is not None
        longer = await state_store.force("long", CircuitState.FORCED_OPEN, for_seconds=3_600.0)
        assert longer.open_until_ts is not None and longer.updated_at_ts is not None
        assert longer.open_until_ts - longer.updated_at_ts == pytest.approx(3_600.0)
        until = datetime.fromtimestamp(longer.updated_at_ts + 60, UTC)
        for bad in (-1.0, math.nan, math.inf):
            with pytest.raises(RecordValidationError, match="for_seconds"):
                await state_store.force("k2", CircuitState.FORCED_OPEN, for_seconds=bad)
        with pytest.raises(RecordValidationError, match="until or for_seconds"):
            await state_store.force("k2", CircuitState.FORCED_OPEN, until=until, for_seconds=1.0)
        assert (await state_store.snapshot("k2")).generation == 0

    async def test_the_provider_rule_holds_for_a_worker_whose_clock_is_off(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        if not state_store.shared:
            pytest.skip(f"{type(state_store).__name__} is not shared between instances")
        policy = _policy(consecutive_failures=1, recovery_seconds=60.0, max_recovery_seconds=60.0)
        for skew in (-90.0, 90.0):  # a worker behind the store's clock, then one ahead
            await state_store.reset()

            def clock(skew: float = skew) -> float:
                return time.time() + skew

            async with CircuitBreaker(state_store, policy, clock=clock) as worker:
                for model in ("a", "b", "c"):  # three models open: the provider rule
                    ticket = await worker.admit(worker.key_for("prov", model))
                    await worker.report(ticket, Outcome.FAILURE, error="503 (contract)")
            held = await state_store.snapshot("prov")
            assert held.state is CircuitState.FORCED_OPEN, (skew, held)
            assert held.open_until_ts is not None and held.updated_at_ts is not None
            assert held.open_until_ts - held.updated_at_ts == pytest.approx(60.0), (skew, held)
            rejected = await state_store.admit("prov", policy)
            assert not rejected.admitted and rejected.retry_after is not None, (skew, rejected)
            assert rejected.retry_after > 30.0, (skew, rejected)

    async def test_a_worker_whose_clock_is_off_judges_open_ends_by_the_stores(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        if await state_store.now() is None:
            pytest.skip(f"{type(state_store).__name__} does not tell its clock")
        policy = _policy(consecutive_failures=1, recovery_seconds=60.0, max_recovery_seconds=60.0)
        for skew in (-3600.0, 3600.0):  # a worker an hour behind the store, then ahead
            await state_store.reset()

            def clock(skew: float = skew) -> float:
                return time.time() + skew

            async with CircuitBreaker(state_store, policy, clock=clock) as worker:
                ticket = await worker.admit("k")
                await worker.report(ticket, Outcome.FAILURE, error="503 (contract)")
                # open for 60 s of the store's clock, whatever the worker's says: its
                # view neither rejects an hour longer nor shows the circuit free
                assert not worker.available_hint("k"), skew
                with pytest.raises(CircuitOpenError) as raised:
                    await worker.admit("k")
                retry_after = raised.value.retry_after
                assert retry_after is not None and 50.0 < retry_after <= 60.0, (skew, retry_after)
                assert not await worker.is_available("k"), skew
                assert (await worker.get_status("k")).state is CircuitState.OPEN, skew


class CircuitStateStoreContract(
    StateStoreFixtures, _KeyChecks, _OpenTimes, StateClockSteps, StateKeyExpiry
):
    """
    The contract of `CircuitStateStore`.  Override the ``state_store_url`` fixture.

    Covers: unseen keys read CLOSED; tripping at the threshold; stale tickets dropped;
    generation strictly increasing on transitions; OPEN -> HALF_OPEN after the recovery
    time; a 429 opening for exactly its Retry-After without counting a trip; probe lease
    exclusivity under 100 concurrent admits; lease expiry; forcing open for a span of
    the store's clock, and the provider rule and the open ends a breaker's view judges
    for a worker whose clock is off it (`CircuitStateStore.now`); force, snapshot,
    snapshot_all and reset (which outdates every ticket issued before it, by the store
    or by a breaker's view, of a key admitted, read or never written); isolation between
    keys; 100 concurrent outcome reports counted exactly; idempotent close; use after
    close; naive datetimes; where the subclass says how (``expire_state_keys``), a key
    idle past its time read, counted and listed as a key never written.
    """

    keeps_state: ClassVar[bool] = True
    """False for a pass-through store that admits everything (``null://``)."""

    @pytest.fixture
    def advance_clock(self) -> AdvanceClock:
        """
        ``await advance(seconds)`` makes the store's clock pass ``seconds``.

        Default: wait that long (`anyio.sleep`), for stores on the wall clock or server
        time.  Override it for a store built with a `FakeClock` (``clock.sleep``).
        """
        return anyio.sleep

    @pytest_asyncio.fixture(loop_scope="function")
    async def state_store(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[CircuitStateStore]:
        """The store under test, built from the URL, entered and closed after the test."""
        store = state_store_from_url(state_store_url, **state_store_options)
        async with store:
            yield store

    def _needs_state(self) -> None:
        if not self.keeps_state:
            pytest.skip(f"{type(self).__name__}: the store keeps no state")

    # -- basics ------------------------------------------------------------------------

    async def test_an_unseen_key_reads_closed_at_generation_zero(
        self, state_store: CircuitStateStore
    ) -> None:
        state = await state_store.snapshot("never-seen")
        assert (state.key, state.state, state.generation) == ("never-seen", CircuitState.CLOSED, 0)
        assert state.failure_count == 0 and not state.is_open and state.probes_in_flight == 0

    async def test_closed_admits_with_a_ticket_of_the_current_generation(
        self, state_store: CircuitStateStore
    ) -> None:
        admission = await state_store.admit("k", _TRIP3)
        assert admission.admitted and admission.retry_after is None
        assert admission.ticket is not None
        assert admission.ticket.key == "k" and admission.ticket.lease_id is None
        assert admission.ticket.generation == (await state_store.snapshot("k")).generation

    async def test_trips_exactly_at_the_threshold(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        below = await _fail(state_store, "one-by-one", _TRIP3, 2)
        assert below.state is CircuitState.CLOSED and below.failure_count == 2
        assert below.generation == 0, "counting failures is not a transition"
        tripped = await _fail(state_store, "one-by-one", _TRIP3, 1)
        assert tripped.state is CircuitState.OPEN and tripped.is_open
        assert tripped.generation == 1
        assert tripped.opened_at is not None and tripped.open_until is not None
        rejected = await state_store.admit("one-by-one", _TRIP3)
        assert not rejected.admitted and rejected.ticket is None
        assert rejected.state.state is CircuitState.OPEN
        assert rejected.retry_after is not None
        assert 0 < rejected.retry_after <= _TRIP3.recovery_seconds + 1e-6

        # the same three failures reported as one batch trip the breaker too
        tickets = [await _admitted(state_store, "batch", _TRIP3) for _ in range(3)]
        batch = await state_store.record("batch", _TRIP3, [_report(t) for t in tickets])
        assert batch.state is CircuitState.OPEN and batch.generation == 1

    async def test_a_success_ends_the_failure_streak(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        await _fail(state_store, "k", _TRIP3, 2)
        ok = await state_store.record(
            "k", _TRIP3, [_report(await _admitted(state_store, "k", _TRIP3), Outcome.SUCCESS)]
        )
        assert ok.failure_count == 0
        state = await _fail(state_store, "k", _TRIP3, 2)
        assert state.state is CircuitState.CLOSED and state.failure_count == 2

    async def test_outcomes_that_are_not_samples_change_nothing(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        await _fail(state_store, "k", _TRIP3, 2)
        for outcome in (o for o in Outcome if not o.is_sample):
            ticket = await _admitted(state_store, "k", _TRIP3)
            state = await state_store.record("k", _TRIP3, [_report(ticket, outcome)])
            assert state.state is CircuitState.CLOSED and state.failure_count == 2, outcome

    # -- generations -----------------------------------------------------------------

    async def test_a_stale_ticket_is_dropped(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1)
        # a reset must outdate tickets even of a key that never changed generation
        fresh = await _admitted(state_store, "fresh", policy)
        await state_store.reset("fresh")
        after_fresh = await state_store.record("fresh", policy, [_report(fresh)])
        assert after_fresh.state is CircuitState.CLOSED and after_fresh.failure_count == 0

        old = await _admitted(state_store, "k", policy)
        forced = await state_store.force("k", CircuitState.CLOSED)
        assert forced.generation > old.generation
        after = await state_store.record("k", policy, [_report(old)])
        assert after.state is CircuitState.CLOSED and after.failure_count == 0
        assert after.generation == forced.generation

        before_reset = await _admitted(state_store, "k", policy)
        await state_store.reset("k")
        after_reset = await state_store.record("k", policy, [_report(before_reset)])
        assert after_reset.state is CircuitState.CLOSED and after_reset.failure_count == 0
        snap = await state_store.snapshot("k")
        assert snap.state is CircuitState.CLOSED and snap.failure_count == 0

    async def test_a_reset_outdates_the_tickets_of_a_key_only_admitted_or_never_written(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1)
        # an admission writes the key, so that a reset of every key finds it
        ticket = await _admitted(state_store, "admitted", policy)
        await state_store.reset()
        after = await state_store.record("admitted", policy, [_report(ticket)])
        assert after.state is CircuitState.CLOSED and after.failure_count == 0
        assert after.generation > ticket.generation
        # a reset is a transition for a key never written too: a ticket of the
        # generation 0 it reads as (a process that read it so may have one) stops counting
        unwritten = Ticket(key="unwritten", generation=0)
        await state_store.reset("unwritten")
        after = await state_store.record("unwritten", policy, [_report(unwritten)])
        assert after.state is CircuitState.CLOSED and after.failure_count == 0
        assert after.generation == 1

    @pytest.mark.parametrize("ttl", [0.0, 1.0])
    @pytest.mark.parametrize("everything", [False, True], ids=["reset(key)", "reset()"])
    async def test_a_breaker_reset_outdates_the_tickets_it_issued_before(
        self, state_store: CircuitStateStore, ttl: float, everything: bool
    ) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1)
        async with CircuitBreaker(state_store, policy, local_view_ttl=ttl) as breaker:
            for key in ("read-first", "admitted-first"):
                if key == "read-first":
                    await breaker.get_status(key)  # a view of a key never written
                ticket = await breaker.admit(key)
                await breaker.reset(None if everything else key)
                # "tickets issued before stop counting": the failure is dropped
                await breaker.report(ticket, Outcome.FAILURE, error="HTTP 503 (contract)")
                state = await breaker.get_status(key)
                assert state.state is CircuitState.CLOSED and state.failure_count == 0, state

    async def test_generation_strictly_increases_on_every_transition(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        seen = [(await state_store.snapshot("k")).generation]
        seen.append((await _fail(state_store, "k", _TRIP3, 3)).generation)  # CLOSED -> OPEN
        targets = (
            CircuitState.FORCED_OPEN,
            CircuitState.DISABLED,
            CircuitState.CLOSED,
            CircuitState.FORCED_OPEN,
            CircuitState.CLOSED,
        )
        seen.extend([(await state_store.force("k", target)).generation for target in targets])
        assert all(a < b for a, b in itertools.pairwise(seen)), seen
        assert (await state_store.snapshot("k")).generation == seen[-1]

    # -- time: recovery, probes, leases ------------------------------------------------

    async def test_open_becomes_half_open_after_recovery_and_a_probe_success_closes(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        opened = await _fail(state_store, "k", _TRIP3, 3)
        rejected = await state_store.admit("k", _TRIP3)
        probe = await _wait_for_probe(state_store, "k", _TRIP3, rejected, advance_clock)
        assert probe.lease_id is not None and probe.lease_expires_ts is not None
        assert probe.generation == opened.generation + 1
        half_open = await state_store.snapshot("k")
        assert half_open.state is CircuitState.HALF_OPEN and half_open.probes_in_flight == 1
        second = await state_store.admit("k", _TRIP3)
        assert not second.admitted and second.state.state is CircuitState.HALF_OPEN
        assert second.retry_after is not None and second.retry_after > 0
        closed = await state_store.record("k", _TRIP3, [_report(probe, Outcome.SUCCESS)])
        assert closed.state is CircuitState.CLOSED and not closed.is_open
        assert closed.generation == probe.generation + 1
        assert (await state_store.admit("k", _TRIP3)).admitted

    async def test_half_open_grants_exactly_the_probe_count_under_concurrency(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        policy = _policy(half_open_probes=3)
        await _fail(state_store, "k", policy, 3)
        admission = await state_store.admit("k", policy)
        results: list[Admission] = []

        async def admit() -> None:
            results.append(await state_store.admit("k", policy))

        for _ in range(5):
            assert admission.retry_after is not None
            await advance_clock(admission.retry_after + 0.05)
            results.clear()
            async with anyio.create_task_group() as tg:
                for _ in range(100):
                    tg.start_soon(admit)
            if any(r.state.state is not CircuitState.OPEN for r in results):
                break
            admission = min(results, key=lambda r: r.retry_after or 0.0)
        granted = [r.ticket for r in results if r.admitted and r.ticket is not None]
        assert len(results) == 100
        assert len(granted) == policy.half_open_probes, (
            f"{len(granted)} of 100 concurrent admits got a probe lease; "
            f"expected exactly {policy.half_open_probes}"
        )
        assert len({t.lease_id for t in granted}) == len(granted)
        assert all(not r.admitted and r.retry_after for r in results if r.ticket is None)
        snap = await state_store.snapshot("k")
        assert snap.state is CircuitState.HALF_OPEN and snap.probes_in_flight == 3

        # one probe fails: OPEN again, and the other probes' tickets are now stale
        reopened = await state_store.record("k", policy, [_report(granted[0])])
        assert reopened.state is CircuitState.OPEN
        assert reopened.generation == granted[0].generation + 1
        late = await state_store.record("k", policy, [_report(granted[1], Outcome.SUCCESS)])
        assert late.state is CircuitState.OPEN and late.generation == reopened.generation

    async def test_an_expired_probe_lease_frees_its_slot(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        policy = _policy(probe_lease_seconds=0.2)
        await _fail(state_store, "k", policy, 3)
        first = await _wait_for_probe(
            state_store, "k", policy, await state_store.admit("k", policy), advance_clock
        )
        blocked = await state_store.admit("k", policy)
        assert not blocked.admitted and blocked.retry_after is not None
        assert 0 < blocked.retry_after <= policy.probe_lease_seconds + 1e-6
        await advance_clock(blocked.retry_after + 0.02)
        # the first probe reports after its lease expired: too late to count
        late = await state_store.record("k", policy, [_report(first, Outcome.SUCCESS)])
        assert late.state is CircuitState.HALF_OPEN, "an expired probe must not close"
        second = await _admitted(state_store, "k", policy)
        assert second.lease_id is not None and second.lease_id != first.lease_id
        closed = await state_store.record("k", policy, [_report(second, Outcome.SUCCESS)])
        assert closed.state is CircuitState.CLOSED

    async def test_forced_open_until_a_time_then_probes(
        self, state_store: CircuitStateStore, advance_clock: AdvanceClock
    ) -> None:
        self._needs_state()
        held = await state_store.force("k", CircuitState.FORCED_OPEN, reason="maintenance")
        assert held.updated_at_ts is not None, "a transition records the store's time"
        until = datetime.fromtimestamp(held.updated_at_ts + 0.2, UTC)
        timed = await state_store.force("k", CircuitState.FORCED_OPEN, until=until)
        assert timed.state is CircuitState.FORCED_OPEN and timed.open_until is not None
        rejected = await state_store.admit("k", _TRIP3)
        assert not rejected.admitted and rejected.retry_after is not None
        assert 0 < rejected.retry_after <= 0.2 + 1e-6
        probe = await _wait_for_probe(state_store, "k", _TRIP3, rejected, advance_clock)
        assert probe.lease_id is not None
        assert (await state_store.snapshot("k")).state is CircuitState.HALF_OPEN

    # -- manual control and isolation --------------------------------------------------

    async def test_force_snapshot_snapshot_all_and_reset(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        await _fail(state_store, "c", _TRIP3, 2)  # keys touched out of order on purpose
        held = await state_store.force("a", CircuitState.FORCED_OPEN, reason="maintenance")
        assert held.state is CircuitState.FORCED_OPEN and held.reason == "maintenance"
        snap = await state_store.snapshot("a")
        assert (snap.state, snap.generation, snap.reason) == (
            held.state,
            held.generation,
            held.reason,
        )
        rejected = await state_store.admit("a", _TRIP3)
        assert not rejected.admitted and rejected.retry_after is None, "held until reset"

        disabled = await state_store.force("b", CircuitState.DISABLED)
        assert disabled.state is CircuitState.DISABLED and not disabled.is_open
        after_failures = await _fail(state_store, "b", _TRIP3, 10)
        assert after_failures.state is CircuitState.DISABLED, "DISABLED never trips"

        everything = await state_store.snapshot_all()
        assert [s.key for s in everything] == ["a", "b", "c"]
        assert [s.state for s in everything] == [
            CircuitState.FORCED_OPEN,
            CircuitState.DISABLED,
            CircuitState.CLOSED,
        ]
        assert everything[2].failure_count == 2

        await state_store.reset("a")
        assert (await state_store.snapshot("a")).state is CircuitState.CLOSED
        assert (await state_store.admit("a", _TRIP3)).admitted
        assert (await state_store.snapshot("b")).state is CircuitState.DISABLED
        assert (await state_store.snapshot("c")).failure_count == 2

        await state_store.reset()
        for state in await state_store.snapshot_all():
            assert state.state is CircuitState.CLOSED and state.failure_count == 0, state
        for key in ("a", "b", "c"):
            assert (await state_store.snapshot(key)).state is CircuitState.CLOSED

        closed = await state_store.force("a", CircuitState.CLOSED, reason="by hand")
        assert closed.state is CircuitState.CLOSED

    async def test_keys_are_isolated(self, state_store: CircuitStateStore) -> None:
        self._needs_state()
        await _fail(state_store, "provider-a", _TRIP3, 3)
        await _fail(state_store, "provider-b", _TRIP3, 2)
        assert (await state_store.snapshot("provider-a")).state is CircuitState.OPEN
        b = await state_store.snapshot("provider-b")
        assert (b.state, b.failure_count, b.generation) == (CircuitState.CLOSED, 2, 0)
        assert (await state_store.admit("provider-b", _TRIP3)).admitted
        assert not (await state_store.admit("provider-a", _TRIP3)).admitted
        await state_store.reset("provider-a")
        assert (await state_store.snapshot("provider-b")).failure_count == 2
        await state_store.force("provider-b", CircuitState.FORCED_OPEN)
        assert (await state_store.snapshot("provider-a")).state is CircuitState.CLOSED
        assert (await state_store.snapshot("provider-a:model-x")).generation == 0

    async def test_concurrent_outcomes_are_counted_exactly(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        policy = _policy(consecutive_failures=1_000)

        async def call(key: str, outcome: Outcome) -> None:
            ticket = await _admitted(state_store, key, policy)
            await state_store.record(key, policy, [_report(ticket, outcome)])

        async with anyio.create_task_group() as tg:
            for _ in range(100):
                tg.start_soon(call, "failing", Outcome.FAILURE)
                tg.start_soon(call, "healthy", Outcome.SUCCESS)
        failing = await state_store.snapshot("failing")
        assert failing.state is CircuitState.CLOSED
        assert (failing.failure_count, failing.window_calls, failing.window_failures) == (
            100,
            100,
            100,
        )
        healthy = await state_store.snapshot("healthy")
        assert (healthy.failure_count, healthy.window_calls, healthy.window_failures) == (
            0,
            100,
            0,
        )

    async def test_a_shared_store_shows_one_instance_to_another(
        self,
        state_store: CircuitStateStore,
        state_store_url: str,
        state_store_options: dict[str, Any],
    ) -> None:
        self._needs_state()
        if not state_store.shared:
            pytest.skip(f"{type(state_store).__name__} is not shared between instances")
        async with state_store_from_url(state_store_url, **state_store_options) as other:
            ticket = await _admitted(state_store, "k", _TRIP3)
            forced = await other.force("k", CircuitState.FORCED_OPEN, reason="from another")
            seen = await state_store.snapshot("k")
            assert (seen.state, seen.generation) == (CircuitState.FORCED_OPEN, forced.generation)
            assert not (await state_store.admit("k", _TRIP3)).admitted
            await other.reset("k")
            stale = await state_store.record("k", _TRIP3, [_report(ticket)])
            assert stale.state is CircuitState.CLOSED and stale.failure_count == 0
            assert [s.key for s in await other.snapshot_all()] == ["k"]

    # -- keys ----------------------------------------------------------------------------

    async def test_the_longest_key_a_breaker_takes_is_held(
        self, state_store: CircuitStateStore
    ) -> None:
        self._needs_state()
        key = "provider:" + "\U0001d11e" * 491  # 500 characters, 4 bytes each but 9
        async with CircuitBreaker(state_store, _TRIP3) as breaker:
            forced = await breaker.force_open(key, reason="the longest key")
            assert (forced.key, forced.state) == (key, CircuitState.FORCED_OPEN)
            assert not await breaker.is_available(key)
            await breaker.reset(key)
            async with breaker.guard(key):
                pass
            assert (await breaker.get_status(key)).state is CircuitState.CLOSED
            assert not breaker.degraded
        assert [s.key for s in await state_store.snapshot_all()] == [key]

    # -- lifecycle and input checks ------------------------------------------------------

    async def test_aclose_is_idempotent(self, state_store: CircuitStateStore) -> None:
        await state_store.admit("k", _TRIP3)
        await state_store.aclose()
        await state_store.aclose()
        assert state_store.closed

    async def test_use_after_close_raises_backend_closed(
        self, state_store: CircuitStateStore
    ) -> None:
        ticket = await _admitted(state_store, "k", _TRIP3)
        await state_store.aclose()
        calls: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("admit", lambda: state_store.admit("k", _TRIP3)),
            ("record", lambda: state_store.record("k", _TRIP3, [_report(ticket)])),
            ("force", lambda: state_store.force("k", CircuitState.FORCED_OPEN)),
            ("snapshot", lambda: state_store.snapshot("k")),
            ("snapshot_all", lambda: state_store.snapshot_all()),
            ("reset", lambda: state_store.reset("k")),
            ("reset all", lambda: state_store.reset()),
        ]
        for name, call in calls:
            with pytest.raises(BackendClosedError) as info:
                await call()
            assert isinstance(info.value, BackendError), name

    async def test_a_naive_until_is_rejected(self, state_store: CircuitStateStore) -> None:
        with pytest.raises(RecordValidationError, match="until") as info:
            await state_store.force("k", CircuitState.FORCED_OPEN, until=datetime(2030, 1, 1, 0, 0))
        assert isinstance(info.value, ValueError)
        state = await state_store.snapshot("k")
        assert (state.state, state.generation) == (CircuitState.CLOSED, 0)

    async def test_an_until_before_1970_is_rejected_and_nothing_stored(
        self, state_store: CircuitStateStore
    ) -> None:
        # no state holds an end before the epoch: a store writing it could not read it back
        with pytest.raises(RecordValidationError, match="until must be 1970-01-01 or later"):
            await state_store.force(
                "k", CircuitState.FORCED_OPEN, until=datetime.min.replace(tzinfo=UTC)
            )
        state = await state_store.snapshot("k")
        assert (state.state, state.generation) == (CircuitState.CLOSED, 0)

    async def test_a_store_that_keeps_nothing_admits_everything(
        self, state_store: CircuitStateStore
    ) -> None:
        if self.keeps_state:
            pytest.skip("the store keeps state; the tests above apply")
        policy = _policy(consecutive_failures=1)
        for _ in range(20):
            ticket = await _admitted(state_store, "k", policy)
            state = await state_store.record("k", policy, [_report(ticket, Outcome.FATAL)])
            assert state.state is CircuitState.CLOSED
        await state_store.force("k", CircuitState.FORCED_OPEN)
        assert (await state_store.admit("k", policy)).admitted
        assert await state_store.snapshot_all() == []
        await state_store.reset()
