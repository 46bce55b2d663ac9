"""
The contracts' cases of a wall clock stepped back (an NTP correction, a virtual machine
resumed): every time a store holds keeps the time it had left when last written
(`empathy_models.circuit.unstepped`, `empathy_models.limits.meter.unstepped`).  Parts of
`CircuitStateStoreContract` and `QuotaStoreContract`, run where the subclass says how to
step its store's clock (the ``step_state_clock`` and ``step_quota_clock`` fixtures).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import pytest

from ...abc import CircuitStateStore, QuotaStore
from ...circuit import BreakerPolicy
from ...records import CircuitBreakerState, CircuitState, Outcome, OutcomeReport, Ticket
from ..clock import FakeClock

__all__ = ["StepQuotaClock", "StepStateClock", "stepping"]

HOUR = 3600.0
_CLOSED = CircuitState.CLOSED

StepQuotaClock = Callable[[float], Awaitable[float]]
"""
``await step(seconds)``: the quota store's clock jumps by ``seconds`` (negative: back,
as an NTP correction steps it) since everything the store holds was written.  Returns
how much later the times the test took before the jump now read on the store's clock:
0 when the store's clock itself was moved (an injected one), ``-seconds`` when, the
clock being a server's, every time the store holds (schedules, holds' lapse times, when
a key was written) was moved by ``-seconds`` instead.  The contract jumps by whole
minutes (`empathy_models.limits.meter.HOLD_BUCKET`), so moved holds keep their buckets.
"""

StepStateClock = Callable[[float, BreakerPolicy], Awaitable[float]]
"""
``await step(seconds, policy)``: as `StepQuotaClock`, for a circuit-state store whose
keys were written under ``policy``: moved instead of the clock, a key's window buckets
move by ``seconds / policy.bucket_seconds`` (a whole number in the contract).
"""


class _Clocked(Protocol):
    def set(self, now: float) -> None: ...

    def __call__(self) -> float: ...


def stepping(clock: FakeClock | _Clocked) -> Callable[..., Awaitable[float]]:
    """
    The ``step_state_clock`` / ``step_quota_clock`` of a store built with ``clock`` (a
    `FakeClock`, or any clock with ``set``): the clock itself jumps, and 0 is returned.
    """

    async def step(seconds: float, policy: BreakerPolicy | None = None) -> float:
        clock.set(clock() + seconds)
        return 0.0

    return step


def written_ahead(state: CircuitBreakerState, seconds: float, buckets: int) -> CircuitBreakerState:
    """
    ``state`` as a clock ``seconds`` (``buckets`` window buckets) ahead would have
    written it: every time in it and its window's buckets moved on.  What a server
    store's ``step_state_clock`` stores over a key, since a server's clock cannot be
    stepped back: the store then finds times ahead of its clock, as after a step back.
    """

    def moved(t: float | None) -> float | None:
        return None if t is None else t + seconds

    return attrs.evolve(
        state,
        opened_at_ts=moved(state.opened_at_ts),
        open_until_ts=moved(state.open_until_ts),
        closed_at_ts=moved(state.closed_at_ts),
        last_failure_ts=moved(state.last_failure_ts),
        updated_at_ts=moved(state.updated_at_ts),
        leases=tuple((lease, ends + seconds) for lease, ends in state.leases),
        window=tuple((b + buckets, calls, failed) for b, calls, failed in state.window),
    )


def _report(ticket: Ticket | None, outcome: Outcome = Outcome.FAILURE, **kw: Any) -> OutcomeReport:
    assert ticket is not None, "an admitted call must carry a ticket"
    return OutcomeReport(ticket=ticket, outcome=outcome, error=f"{outcome.value} (contract)", **kw)


async def _ticket(store: CircuitStateStore, key: str, policy: BreakerPolicy) -> Ticket:
    admission = await store.admit(key, policy)
    assert admission.admitted and admission.ticket is not None, admission
    return admission.ticket


async def _outcome(
    store: CircuitStateStore, key: str, policy: BreakerPolicy, outcome: Outcome = Outcome.FAILURE
) -> CircuitBreakerState:
    return await store.record(key, policy, [_report(await _ticket(store, key, policy), outcome)])


async def _probe(
    store: CircuitStateStore, key: str, policy: BreakerPolicy, advance: Callable[[float], Any]
) -> Ticket:
    """The first half-open probe of an OPEN ``key``, its open time let pass."""
    for _ in range(20):
        admission = await store.admit(key, policy)
        if admission.admitted:
            assert admission.ticket is not None and admission.ticket.lease_id is not None
            return admission.ticket
        assert admission.retry_after is not None, admission
        await advance(admission.retry_after + 0.02)
    raise AssertionError(f"{key!r} never admitted a probe")


class StateClockSteps:
    """A clock stepped back, for `CircuitStateStoreContract`."""

    def _needs_state(self) -> None:
        """Skip a store that keeps no state (`CircuitStateStoreContract` overrides it)."""

    @pytest.fixture
    def step_state_clock(self) -> StepStateClock | None:
        """
        How to step the store's clock (`StepStateClock`); ``None`` (the default) skips
        the clock-step tests.  A store with an injected `FakeClock` returns
        ``stepping(clock)``; a server's clock cannot be stepped, so a server store's
        test moves every time its keys hold instead.
        """
        return None

    def _stepper(self, step: StepStateClock | None) -> StepStateClock:
        self._needs_state()
        if step is None:
            pytest.skip(f"{type(self).__name__} does not override 'step_state_clock'")
        return step

    async def test_a_closed_window_keeps_its_age_when_the_clock_steps_back(
        self,
        state_store: CircuitStateStore,
        step_state_clock: StepStateClock | None,
        advance_clock: Callable[[float], Awaitable[None]],
    ) -> None:
        step = self._stepper(step_state_clock)
        policy = BreakerPolicy(
            consecutive_failures=1_000,
            minimum_calls=10,
            failure_rate_threshold=0.5,
            window_seconds=3.0,
            window_buckets=3,
            recovery_seconds=60.0,
            max_recovery_seconds=60.0,
        )
        for key, successes in (("later", 4), ("now", 5)):  # 4 failures: under the minimum
            for outcome in [Outcome.FAILURE] * 4 + [Outcome.SUCCESS] * successes:
                assert (await _outcome(state_store, key, policy, outcome)).state is _CLOSED
        await step(-HOUR, policy)
        # the outcomes are as recent as they were: one more failure trips on the rate
        tripped = await _outcome(state_store, "now", policy)
        assert tripped.state is CircuitState.OPEN, tripped
        assert tripped.reason == "failure rate 5/10 over 3s", tripped
        # and they leave the window once its span has passed, not an hour later
        assert (await _outcome(state_store, "later", policy, Outcome.SUCCESS)).state is _CLOSED
        await advance_clock(3.1)
        state = await _outcome(state_store, "later", policy)
        assert state.state is CircuitState.CLOSED, state
        assert [(calls, failed) for _, calls, failed in state.window] == [(1, 1)], state

    async def test_healthy_time_counts_from_the_close_when_the_clock_steps_back(
        self,
        state_store: CircuitStateStore,
        step_state_clock: StepStateClock | None,
        advance_clock: Callable[[float], Awaitable[None]],
    ) -> None:
        step = self._stepper(step_state_clock)
        policy = BreakerPolicy(
            consecutive_failures=1,
            recovery_seconds=0.2,
            max_recovery_seconds=10.0,
            healthy_decay_seconds=0.5,
        )
        assert (await _outcome(state_store, "k", policy)).open_count == 1
        probe = await _probe(state_store, "k", policy, advance_clock)
        closed = await state_store.record("k", policy, [_report(probe, Outcome.SUCCESS)])
        assert closed.state is CircuitState.CLOSED
        await step(-HOUR, policy)
        assert (await _outcome(state_store, "k", policy, Outcome.SUCCESS)).state is _CLOSED
        await advance_clock(0.6)  # closed longer than healthy_decay_seconds: one trip forgotten
        again = await _outcome(state_store, "k", policy)
        assert again.state is CircuitState.OPEN and again.open_count == 1, again
        assert again.open_until_ts is not None and again.opened_at_ts is not None
        assert again.open_until_ts - again.opened_at_ts == pytest.approx(0.2), again

    async def test_probe_leases_keep_their_time_through_a_probe_reported_after_a_step_back(
        self,
        state_store: CircuitStateStore,
        step_state_clock: StepStateClock | None,
        advance_clock: Callable[[float], Awaitable[None]],
    ) -> None:
        step = self._stepper(step_state_clock)
        policy = BreakerPolicy(
            consecutive_failures=1,
            recovery_seconds=0.2,
            max_recovery_seconds=0.2,
            probe_lease_seconds=1.0,
            half_open_probes=2,
        )
        probes = {}
        for key in ("late", "dead"):  # two probes each
            await _outcome(state_store, key, policy)
            probes[key] = (
                await _probe(state_store, key, policy, advance_clock),
                await _ticket(state_store, key, policy),
            )
        await step(-HOUR, policy)
        for key, (first, _) in probes.items():  # the first probes answer at once
            half = await state_store.record(key, policy, [_report(first, Outcome.SUCCESS)])
            assert half.state is CircuitState.HALF_OPEN and half.probe_successes == 1, half
        await advance_clock(1.1)  # the second probes' leases end
        # a probe answering after its lease ended is not counted, however the clock stepped
        second = probes["late"][1]
        late = await state_store.record("late", policy, [_report(second, Outcome.SUCCESS)])
        assert late.state is CircuitState.HALF_OPEN and late.probe_successes == 1, late
        # a dead probe's slot comes back when its lease ends, not an hour later
        assert (await state_store.admit("dead", policy)).admitted
        freed = await state_store.admit("dead", policy)
        assert freed.admitted, freed

    async def test_a_429_and_a_force_after_a_step_back_take_the_time_left(
        self, state_store: CircuitStateStore, step_state_clock: StepStateClock | None
    ) -> None:
        step = self._stepper(step_state_clock)
        policy = BreakerPolicy(
            consecutive_failures=1, recovery_seconds=60.0, max_recovery_seconds=60.0
        )
        early = await _ticket(state_store, "k", policy)  # a call made before the trip
        assert (await _outcome(state_store, "k", policy)).state is CircuitState.OPEN
        await state_store.force("f", CircuitState.FORCED_OPEN, for_seconds=300.0)
        await step(-HOUR, policy)
        # the early call's 429 holds the circuit for its Retry-After, past the 60 s left
        report = _report(early, Outcome.RATE_LIMITED, retry_after=120.0)
        held = await state_store.record("k", policy, [report])
        assert held.open_until_ts is not None and held.updated_at_ts is not None
        assert held.open_until_ts - held.updated_at_ts == pytest.approx(120.0), held
        refused = await state_store.admit("k", policy)
        assert refused.retry_after is not None and 110.0 < refused.retry_after <= 120.0
        # a shorter force keeps the time the forced period had left, not an hour more
        forced = await state_store.force("f", CircuitState.FORCED_OPEN, for_seconds=1.0)
        assert forced.open_until_ts is not None and forced.updated_at_ts is not None
        assert 290.0 < forced.open_until_ts - forced.updated_at_ts <= 300.0, forced


class QuotaClockSteps:
    """A clock stepped back, for `QuotaStoreContract`."""

    @pytest.fixture
    def step_quota_clock(self) -> StepQuotaClock | None:
        """
        How to step the store's clock (`StepQuotaClock`); ``None`` (the default) skips
        the clock-step tests.  A store built with an injected clock (``clock=`` in
        ``quota_store_options``) returns ``stepping(clock)``; a server's clock cannot be
        stepped, so a server store's test moves every time the store holds instead.
        """
        return None

    async def test_a_hold_keeps_the_time_it_had_left_when_the_clock_steps_back(
        self, quota_store: QuotaStore, step_quota_clock: StepQuotaClock | None
    ) -> None:
        if step_quota_clock is None:
            pytest.skip(f"{type(self).__name__} does not override 'step_quota_clock'")
        step = step_quota_clock
        kw: dict[str, Any] = {"window_start": 1_800_000_000.0, "window_end": 1_800_086_400.0}
        now = time.time()  # the store's clock, until it steps
        dead, live = now + 240.0, now + 600.0  # a killed worker's hold; a call in flight
        for key, amount, lapses_at in (("b", 300, dead), ("b", 200, live), ("c", 1, dead)):
            grant = await quota_store.reserve(
                key, **kw, amount=amount, limit=1000, lapses_at=lapses_at
            )
            assert grant.granted, grant
        later = await step(-HOUR)
        u = await quota_store.usage("b", **kw)
        assert u.held == 500 and u.held_until is not None, u
        store_now = time.time() - HOUR + later
        assert u.held_until - store_now <= 600.0 + 61.0, u  # the time left, not an hour more
        # the call in flight through the step settles its hold as before
        u = await quota_store.settle("b", **kw, held=200, actual=150, lapses_at=live + later)
        assert (u.held, u.spent, u.settled, u.released, u.overrun) == (300, 150, 150, 50, 0), u
        # a hold reserved after the step into a bucket whose hold was moved lapses at
        # the bucket's own time, with the moved one: never early
        joined = await quota_store.reserve("c", **kw, amount=1, limit=1000, lapses_at=dead + later)
        assert joined.usage.held_until == math.ceil(dead / 60) * 60 + later, joined.usage
        # the dead worker's hold lapses when its time has passed: 6 minutes on
        await step(360.0)
        grant = await quota_store.reserve("b", **kw, amount=850, limit=1000)
        assert grant.granted, grant.usage
        assert (grant.usage.lapsed, grant.usage.held) == (300, 850), grant.usage
