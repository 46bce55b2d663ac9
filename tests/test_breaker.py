"""`CircuitBreaker` through its public API, on the memory store with a fake clock."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import anyio.lowlevel
import attrs
import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
    Outcome,
    RateLimitedError,
)
from empathy_models.abc import CircuitStateStore
from empathy_models.backends import MemoryStateStore
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.breaker import BreakerEvent, BreakerEventKind
from empathy_models.exceptions import (
    AuthenticationError,
    BackendClosedError,
    ContextWindowExceededError,
    InvalidRequestError,
    ServerError,
)
from empathy_models.outcomes import classify_error, retry_after_of
from empathy_models.records import CircuitBreakerState
from empathy_models.testing.clock import FakeClock

KEY = "anthropic"
POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=100, recovery_seconds=60.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(
    clock: FakeClock, policy: BreakerPolicy = POLICY, **kwargs: object
) -> tuple[CircuitBreaker, MemoryStateStore]:
    store = MemoryStateStore(clock=clock)
    return CircuitBreaker(store, policy, clock=clock, **kwargs), store  # type: ignore[arg-type]


async def fail(breaker: CircuitBreaker, exc: BaseException | None = None, key: str = KEY) -> None:
    with pytest.raises(type(exc) if exc is not None else ServerError):
        async with breaker.guard(key):
            raise exc if exc is not None else ServerError("boom", status=503)


async def succeed(breaker: CircuitBreaker, key: str = KEY) -> None:
    async with breaker.guard(key):
        pass


# --------------------------------------------------------------------------- trips and recovery


async def test_trips_at_the_threshold_and_rejects_with_details(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await fail(breaker)
        await fail(breaker)
        assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED
        await fail(breaker)
        with pytest.raises(CircuitOpenError) as info:
            async with breaker.guard(KEY):
                raise AssertionError("the guarded block must not run")  # pragma: no cover
        err = info.value
        assert err.key == KEY
        assert err.state is CircuitState.OPEN
        assert err.retry_after == pytest.approx(60.0)
        assert err.last_error == "ServerError: boom"
        assert err.reason == "3 consecutive failures"
        status = await breaker.get_status(KEY)
        assert status.is_open and status.failure_count == 3
        assert status.opened_at == clock.as_datetime()


async def test_successes_reset_the_streak_even_when_written_behind(clock: FakeClock) -> None:
    breaker, store = make(clock)
    async with breaker:
        await fail(breaker)
        await fail(breaker)
        for _ in range(5):
            await succeed(breaker)
        await fail(breaker)
        await fail(breaker)
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED
        assert status.failure_count == 2
        assert status.window_calls == 9
        assert (await store.snapshot(KEY)).window_calls == 9


async def test_half_open_admits_one_probe_and_its_success_closes(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        for _ in range(3):
            await fail(breaker)
        clock.advance(60)
        probe = await breaker.admit(KEY)
        assert probe.lease_id is not None
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.state is CircuitState.HALF_OPEN
        assert info.value.retry_after == pytest.approx(POLICY.probe_lease_seconds)
        await breaker.report(probe, Outcome.SUCCESS)
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED and status.failure_count == 0
        await succeed(breaker)


async def test_probe_failure_reopens_for_longer(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        for _ in range(3):
            await fail(breaker)
        clock.advance(60)
        await fail(breaker)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(120.0)


async def test_a_fatal_error_keeps_the_healthy_time_that_decayed_earlier_trips(
    clock: FakeClock,
) -> None:
    # two trips, recovered, then a day closed: both forgotten. A 401 then forces the key
    # open; the next trip after it is a first trip again (60 s), not a third (180 s)
    breaker, _ = make(clock)
    async with breaker:
        for _ in range(3):
            await fail(breaker)
        clock.advance(60)
        await fail(breaker)  # the probe fails: the second trip, 120 s
        clock.advance(120)
        await succeed(breaker)
        assert (await breaker.get_status(KEY)).open_count == 2
        clock.advance(86400)
        await fail(breaker, AuthenticationError("invalid x-api-key", status=401))
        assert (await breaker.get_status(KEY)).state is CircuitState.FORCED_OPEN
        clock.advance(POLICY.fatal_open_seconds)
        await succeed(breaker)  # the probe after the forced period closes the key
        for _ in range(3):
            await fail(breaker)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(60.0)


async def test_call_passes_arguments_and_returns_the_result(clock: FakeClock) -> None:
    breaker, _ = make(clock)

    async def add(a: int, b: int, *, times: int = 1) -> int:
        return (a + b) * times

    async with breaker:
        assert await breaker.call(KEY, add, 2, 3, times=2) == 10
        with pytest.raises(ServerError):
            await breaker.call(KEY, _raise_server_error)
        assert (await breaker.get_status(KEY)).failure_count == 1


async def test_call_passes_keywords_named_key_and_fn_to_the_function(clock: FakeClock) -> None:
    breaker, _ = make(clock)

    async def lookup(*, key: str, fn: str) -> str:
        return f"{key}/{fn}"

    async with breaker:
        assert await breaker.call(KEY, lookup, key="user-1", fn="get") == "user-1/get"
        assert (await breaker.get_status(KEY)).window_calls == 1


async def _raise_server_error() -> None:
    raise ServerError("down", status=500)


# --------------------------------------------------------------------------- outcome classes


async def test_invalid_requests_count_as_neither(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await fail(breaker)
        for _ in range(10):
            await fail(breaker, InvalidRequestError("bad", status=400))
            await fail(breaker, ContextWindowExceededError("too long", status=400))
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED
        assert status.failure_count == 1
        assert status.window_calls == 1


async def test_authentication_error_forces_open_with_the_reason(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await fail(breaker, AuthenticationError("bad key", status=401))
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.state is CircuitState.FORCED_OPEN
        assert info.value.reason == "AuthenticationError: bad key"
        assert info.value.retry_after == pytest.approx(POLICY.fatal_open_seconds)


async def test_rate_limit_opens_for_its_retry_after(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await fail(breaker, RateLimitedError("slow down", status=429, retry_after=300.0))
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.state is CircuitState.OPEN
        assert info.value.retry_after == pytest.approx(300.0)


async def _bad_request() -> None:
    raise InvalidRequestError("bad tool schema", status=400)


async def test_errors_from_a_task_group_are_classified_by_their_leaves(clock: FakeClock) -> None:
    """A fan-out's ExceptionGroup counts as its most telling leaf, not as a failure."""
    breaker, _ = make(clock)
    async with breaker:
        for _ in range(5):  # 400s raised in a TaskGroup: neither success nor failure
            with pytest.raises(ExceptionGroup):
                async with breaker.guard(KEY), asyncio.TaskGroup() as tg:
                    tg.create_task(_bad_request())
        status = await breaker.get_status(KEY)
        assert (status.state, status.failure_count, status.window_calls) == (
            CircuitState.CLOSED,
            0,
            0,
        )
        # any failing leaf makes the group a failure
        await fail(breaker, ExceptionGroup("fan-out", [_invalid(), ServerError("x", status=503)]))
        assert (await breaker.get_status(KEY)).failure_count == 1
        # rate limits keep the longest Retry-After, however deep in the group
        limited = ExceptionGroup(
            "fan-out",
            [
                RateLimitedError("slow down", status=429, retry_after=30.0),
                ExceptionGroup("inner", [RateLimitedError("later", status=429, retry_after=300.0)]),
                _invalid(),
            ],
        )
        await fail(breaker, limited)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.state is CircuitState.OPEN
        assert info.value.retry_after == pytest.approx(300.0)


def _invalid() -> InvalidRequestError:
    return InvalidRequestError("bad request", status=400)


def test_a_group_is_classified_by_its_most_telling_leaf() -> None:
    server, auth = ServerError("down", status=503), AuthenticationError("key", status=401)
    slow = RateLimitedError("slow", status=429, retry_after=5.0)
    cases: list[tuple[list[BaseException], Outcome, float | None]] = [
        ([_invalid(), _invalid()], Outcome.IGNORED, None),
        ([_invalid(), server], Outcome.FAILURE, None),
        ([slow, server], Outcome.FAILURE, None),
        ([server, auth, slow], Outcome.FATAL, None),
        ([_invalid(), slow, RateLimitedError("x", status=429)], Outcome.RATE_LIMITED, 5.0),
        (
            [CircuitOpenError("k", state=CircuitState.OPEN, retry_after=99.0), _invalid()],
            Outcome.IGNORED,
            None,
        ),
        (
            [CircuitOpenError("k", state=CircuitState.OPEN, retry_after=99.0)],
            Outcome.REJECTED,
            99.0,
        ),
    ]
    for leaves, outcome, retry_after in cases:
        group = BaseExceptionGroup("g", [BaseExceptionGroup("nested", leaves)])
        assert (classify_error(group), retry_after_of(group)) == (outcome, retry_after), leaves
    # a user predicate sees the group first, then each leaf
    assert classify_error(ExceptionGroup("g", [server]), lambda e: Outcome.IGNORED) is (
        Outcome.IGNORED
    )
    leaf_rule = lambda e: Outcome.IGNORED if isinstance(e, ServerError) else None  # noqa: E731
    assert classify_error(ExceptionGroup("g", [server, _invalid()]), leaf_rule) is Outcome.IGNORED


async def test_an_interrupt_beside_a_failure_in_a_group_still_counts_the_failure(
    clock: FakeClock,
) -> None:
    breaker, _ = make(clock)
    async with breaker:
        assert breaker.classify(KeyboardInterrupt()) is Outcome.CANCELLED
        alone = BaseExceptionGroup("g", [KeyboardInterrupt()])
        assert breaker.classify(alone) is Outcome.CANCELLED
        both = BaseExceptionGroup("g", [KeyboardInterrupt(), ServerError("down", status=503)])
        assert breaker.classify(both) is Outcome.FAILURE


async def test_user_predicate_overrides_the_default_class(clock: FakeClock) -> None:
    def classify(exc: BaseException) -> Outcome | None:
        if isinstance(exc, KeyError):
            return Outcome.IGNORED
        if isinstance(exc, InvalidRequestError):
            return Outcome.FAILURE
        return None

    breaker, _ = make(clock, classify=classify)
    async with breaker:
        for _ in range(5):
            await fail(breaker, KeyError("expected miss"))
        assert (await breaker.get_status(KEY)).failure_count == 0
        await fail(breaker, ValueError("unknown errors are failures"))
        assert (await breaker.get_status(KEY)).failure_count == 1
        await fail(breaker, InvalidRequestError("counted by the predicate", status=400))
        assert (await breaker.get_status(KEY)).failure_count == 2


async def test_low_level_admit_and_report_drop_stale_tickets(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        early = await breaker.admit(KEY)
        for _ in range(3):
            ticket = await breaker.admit(KEY)
            await breaker.report(ticket, Outcome.FAILURE, error="503")
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.OPEN
        # a failure of the generation before the trip counts for nothing
        # (a late 429 is the one exception: see the Retry-After test below)
        await breaker.report(early, Outcome.FAILURE, error="late 503")
        after = await breaker.get_status(KEY)
        assert after == status


# --------------------------------------------------------------------------- cancellation


async def _trip_and_wait(breaker: CircuitBreaker, clock: FakeClock) -> None:
    for _ in range(3):
        await fail(breaker)
    clock.advance(60)


async def test_cancel_scope_returns_the_probe_lease_and_records_nothing(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await _trip_and_wait(breaker, clock)
        ran = False
        with anyio.CancelScope() as scope:
            async with breaker.guard(KEY) as ticket:
                assert ticket.lease_id is not None
                ran = True
                scope.cancel()
                await anyio.sleep(3600)
        assert ran and scope.cancelled_caught
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.HALF_OPEN
        assert status.probes_in_flight == 0
        assert status.probe_successes == 0
        # the slot is free at once: another probe is admitted and closes the circuit
        await succeed(breaker)
        assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


async def test_move_on_after_in_closed_records_no_failure(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await fail(breaker)
        await fail(breaker)
        for _ in range(5):
            with anyio.move_on_after(0):
                async with breaker.guard(KEY):
                    await anyio.sleep(3600)
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED
        assert status.failure_count == 2
        assert status.window_calls == 2


async def test_cancelled_task_propagates_and_counts_nothing(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    started = asyncio.Event()

    async def guarded() -> None:
        async with breaker.guard(KEY):
            started.set()
            await asyncio.sleep(3600)

    async with breaker:
        await _trip_and_wait(breaker, clock)
        task = asyncio.create_task(guarded())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.HALF_OPEN
        assert status.probes_in_flight == 0


# --------------------------------------------------------------------------- listeners


async def test_sync_async_and_failing_listeners(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    seen_sync: list[BreakerEvent] = []
    seen_async: list[BreakerEvent] = []

    def broken(event: BreakerEvent) -> None:
        raise RuntimeError("listener bug")

    async def async_listener(event: BreakerEvent) -> None:
        await anyio.lowlevel.checkpoint()
        seen_async.append(event)

    breaker, _ = make(clock, listeners=[broken, seen_sync.append])
    breaker.add_listener(async_listener)
    tripped_at = clock.as_datetime()
    with caplog.at_level(logging.ERROR, logger="empathy_models.breaker"):
        async with breaker:
            await _trip_and_wait(breaker, clock)
            await succeed(breaker)
    transitions = [(e.old_state, e.new_state) for e in seen_sync]
    assert transitions == [
        (CircuitState.CLOSED, CircuitState.OPEN),
        (CircuitState.OPEN, CircuitState.HALF_OPEN),
        (CircuitState.HALF_OPEN, CircuitState.CLOSED),
    ]
    assert seen_async == seen_sync
    trip = seen_sync[0]
    assert trip.kind is BreakerEventKind.STATE_CHANGED
    assert trip.key == KEY
    assert trip.reason == "3 consecutive failures"
    assert trip.generation == 1
    assert trip.open_until == tripped_at + timedelta(seconds=60)
    assert trip.at == tripped_at
    assert len([r for r in caplog.records if "listener" in r.getMessage()]) == 3
    assert "listener bug" in caplog.text


_WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="")


async def test_every_listener_hears_the_changes_in_order_behind_a_slow_one(
    clock: FakeClock,
) -> None:
    # the trip's slow listener still runs when another task's probe closes the key
    waiting, release = anyio.Event(), anyio.Event()
    heard: list[tuple[str | None, CircuitState | None, str]] = []

    async def slow(event: BreakerEvent) -> None:
        if event.new_state is CircuitState.OPEN:
            waiting.set()
            await release.wait()

    async def forcing(event: BreakerEvent) -> None:
        if event.new_state is CircuitState.OPEN:  # a change made by a listener itself
            await breaker.force_open("other")

    async def hear(event: BreakerEvent) -> None:
        await anyio.lowlevel.checkpoint()
        # in the context of the task whose call caused it (the executor's span, say)
        heard.append((event.key, event.new_state, _WHO.get()))

    breaker, _ = make(clock, listeners=[slow, forcing, hear])

    async def trip() -> None:
        _WHO.set("trip")
        for _ in range(3):
            await fail(breaker)

    async def probe() -> None:
        _WHO.set("probe")
        await succeed(breaker)

    with anyio.fail_after(5):
        async with breaker:
            async with anyio.create_task_group() as tg:
                tg.start_soon(trip)
                await waiting.wait()
                clock.advance(60)
                tg.start_soon(probe)  # half-open, then closed
                await anyio.wait_all_tasks_blocked()
                release.set()
            assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED
    # in the order the breaker saw them: the probe's changes before the listener's own
    assert heard == [
        (KEY, CircuitState.OPEN, "trip"),
        (KEY, CircuitState.HALF_OPEN, "probe"),
        (KEY, CircuitState.CLOSED, "probe"),
        ("other", CircuitState.FORCED_OPEN, "trip"),
    ]


async def test_events_behind_a_delivery_cancelled_in_a_listener_are_still_delivered(
    clock: FakeClock,
) -> None:
    waiting, closed = anyio.Event(), anyio.Event()
    heard: list[CircuitState | None] = []

    async def hanging(event: BreakerEvent) -> None:
        if event.new_state is CircuitState.OPEN:
            waiting.set()
            await anyio.sleep_forever()

    def hear(event: BreakerEvent) -> None:
        heard.append(event.new_state)
        if event.new_state is CircuitState.CLOSED:
            closed.set()

    breaker, _ = make(clock, listeners=[hanging, hear])
    with anyio.fail_after(5):
        async with breaker:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_trip_and_wait, breaker, clock)
                await waiting.wait()  # the trip's task hangs in a listener
                clock.advance(60)
                await succeed(breaker)  # the probe: its events wait behind the trip's
                assert heard == []
                tg.cancel_scope.cancel()
            await closed.wait()
    # the trip's own event reached no listener after the one cancelled in it
    assert heard == [CircuitState.HALF_OPEN, CircuitState.CLOSED]


async def test_rejection_events_are_opt_in(clock: FakeClock) -> None:
    events: list[BreakerEvent] = []
    breaker, _ = make(clock, listeners=[events.append], rejection_events=True)
    quiet, _ = make(clock, listeners=[events.append])
    async with breaker, quiet:
        await breaker.force_open(KEY, reason="maintenance")
        with pytest.raises(CircuitOpenError):
            await breaker.admit(KEY)
        await quiet.force_open(KEY)
        with pytest.raises(CircuitOpenError):
            await quiet.admit(KEY)
    kinds = [e.kind for e in events]
    assert kinds.count(BreakerEventKind.CALL_REJECTED) == 1
    rejected = next(e for e in events if e.kind is BreakerEventKind.CALL_REJECTED)
    assert rejected.new_state is CircuitState.FORCED_OPEN
    assert rejected.reason == "maintenance"


# --------------------------------------------------------------------------- inspection and control


DECAY = BreakerPolicy(
    consecutive_failures=1,
    recovery_seconds=10.0,
    max_recovery_seconds=1_000.0,
    healthy_decay_seconds=100.0,
)


async def _trip_and_recover(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """One more trip of KEY, then its probe's success closes it."""
    await fail(breaker)
    status = await breaker.get_status(KEY)
    assert status.open_until_ts is not None
    clock.set(status.open_until_ts)
    await succeed(breaker)
    assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


async def _forced_for(breaker: CircuitBreaker, clock: FakeClock, seconds: float) -> None:
    """Force KEY open for ``seconds``, wait them out, and let the probe close it."""
    await breaker.force_open(KEY, until=clock.as_datetime() + timedelta(seconds=seconds))
    clock.advance(seconds)
    await succeed(breaker)
    assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


async def _next_open_seconds(breaker: CircuitBreaker, clock: FakeClock) -> float:
    await fail(breaker)
    status = await breaker.get_status(KEY)
    assert status.state is CircuitState.OPEN and status.open_until_ts is not None
    return status.open_until_ts - clock()


async def test_a_probe_answering_after_its_lease_is_not_counted_and_says_why(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=10.0, probe_lease_seconds=30.0)
    breaker, _ = make(clock, policy)
    async with breaker:
        await fail(breaker)
        clock.advance(10)
        with caplog.at_level(logging.WARNING, logger="empathy_models.breaker"):
            async with breaker.guard(KEY):
                clock.advance(31)  # a call longer than the probe's lease
        assert (await breaker.get_status(KEY)).state is CircuitState.HALF_OPEN
        [warning] = [r.getMessage() for r in caplog.records if "lease" in r.getMessage()]
        assert "probe_lease_seconds=30" in warning and "31" in warning, warning
        await succeed(breaker)  # a probe answering in time closes the key
        assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_manual_force_keeps_the_healthy_time_before_it_and_adds_none(
    clock: FakeClock, store: str, tmp_path: Path
) -> None:
    @contextlib.asynccontextmanager
    async def breaker() -> AsyncIterator[CircuitBreaker]:
        held: CircuitStateStore = MemoryStateStore(clock=clock)
        if store == "sqlite":
            held = SQLiteStateStore(tmp_path / f"{clock():.0f}.db", clock=clock)
        async with held, CircuitBreaker(held, DECAY, clock=clock, local_view_ttl=0) as b:
            yield b

    # one trip, then a decay period closed (forgetting it), then a force: the next trip
    # is a first one again (10 s), not a second (20 s)
    async with breaker() as b:
        await _trip_and_recover(b, clock)
        clock.advance(150)
        await _forced_for(b, clock, 500)
        assert await _next_open_seconds(b, clock) == pytest.approx(10.0)
    # half a period closed before the force and half after add up to one
    clock.advance(10_000)
    async with breaker() as b:
        await _trip_and_recover(b, clock)
        clock.advance(50)
        await _forced_for(b, clock, 500)
        clock.advance(50)
        assert await _next_open_seconds(b, clock) == pytest.approx(10.0)
    # the forced time itself is no healthy time: two trips, 50 s closed, forced 500 s
    clock.advance(10_000)
    async with breaker() as b:
        await _trip_and_recover(b, clock)
        await _trip_and_recover(b, clock)
        clock.advance(50)
        await _forced_for(b, clock, 500)
        assert await _next_open_seconds(b, clock) == pytest.approx(30.0)


async def test_status_shows_live_figures_and_leaves_the_stored_state_as_it_is(
    clock: FakeClock,
) -> None:
    """Expired probe leases and failures that left the window are not shown as current."""
    breaker, store = make(clock)
    async with breaker:
        await fail(breaker, key="quiet")
        await fail(breaker, key="quiet")
        for _ in range(3):
            await fail(breaker)
        clock.advance(60)
        probe = await breaker.admit(KEY)  # a probe whose caller never reports
        assert (await breaker.get_status(KEY)).probes_in_flight == 1
        clock.advance(POLICY.probe_lease_seconds)
        status = await breaker.get_status(KEY)
        assert (status.state, status.probes_in_flight) == (CircuitState.HALF_OPEN, 0)
        assert await breaker.is_available(KEY)
        quiet = await breaker.get_status("quiet")  # two failures, long out of the window
        assert (quiet.failure_count, quiet.window_calls, quiet.window_failures) == (2, 0, 0)
        assert [s.window_calls for s in await breaker.snapshot() if s.key == "quiet"] == [0]
        # the store keeps what it holds; the next operation drops it as it always did
        assert (await store.snapshot(KEY)).leases != ()
        assert (await store.snapshot("quiet")).window_calls == 2
        assert probe.lease_id is not None


def test_an_open_circuit_whose_time_is_up_says_so() -> None:
    state = CircuitBreakerState(
        key=KEY, state=CircuitState.OPEN, generation=1, opened_at_ts=100.0, open_until_ts=160.0
    )
    assert not state.open_ended(159.0) and state.open_ended(160.0)
    held = attrs.evolve(state, state=CircuitState.FORCED_OPEN, open_until_ts=None)
    assert not held.open_ended(1e12), "held until a reset"
    assert not attrs.evolve(state, state=CircuitState.CLOSED).open_ended(1e12)


async def test_available_hint_follows_the_local_view(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        assert breaker.available_hint(KEY)
        assert breaker.available_hint("never-seen")
        for _ in range(3):
            await fail(breaker)
        assert not breaker.available_hint(KEY)
        clock.advance(59)
        assert not breaker.available_hint(KEY)
        clock.advance(1)
        assert breaker.available_hint(KEY)
        probe = await breaker.admit(KEY)
        assert not breaker.available_hint(KEY)  # the only probe slot is taken
        await breaker.report(probe, Outcome.SUCCESS)
        assert breaker.available_hint(KEY)


async def test_all_available_hint_says_when_no_view_can_refuse(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        assert breaker.all_available_hint()
        await succeed(breaker, "openai")
        for _ in range(3):
            await fail(breaker)
        assert not breaker.all_available_hint()
        assert not breaker.available_hint(KEY) and breaker.available_hint("openai")
        clock.advance(60)
        probe = await breaker.admit(KEY)  # HALF_OPEN, its only probe slot taken
        assert not breaker.all_available_hint()
        await breaker.report(probe, Outcome.SUCCESS)
        assert breaker.all_available_hint()
        await breaker.force_open("openai")
        assert not breaker.all_available_hint()
        await breaker.reset("openai")
        assert breaker.all_available_hint()


async def test_is_available_snapshot_and_reset(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await succeed(breaker, "openai")
        for _ in range(3):
            await fail(breaker)
        assert not await breaker.is_available(KEY)
        assert await breaker.is_available("openai")
        assert await breaker.is_available("never-seen")
        keys = [(s.key, s.state) for s in await breaker.snapshot()]
        assert keys == [(KEY, CircuitState.OPEN), ("openai", CircuitState.CLOSED)]
        await breaker.reset(KEY)
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED and status.open_count == 0
        await succeed(breaker)
        for _ in range(3):
            await fail(breaker)
        for _ in range(3):
            await fail(breaker, key="openai")
        await breaker.reset()
        assert all(s.state is CircuitState.CLOSED for s in await breaker.snapshot())
        assert breaker.available_hint(KEY) and breaker.available_hint("openai")


async def test_force_open_until_then_probe(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        state = await breaker.force_open(KEY, until=clock.as_datetime() + timedelta(seconds=30))
        assert state.state is CircuitState.FORCED_OPEN
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(30.0)
        clock.advance(30)
        await succeed(breaker)
        assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


async def test_force_open_without_end_holds_until_reset(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await breaker.force_open(KEY, reason="provider incident")
        clock.advance(10**6)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after is None
        assert info.value.reason == "provider incident"
        await breaker.reset(KEY)
        await succeed(breaker)


async def test_disable_admits_everything(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    async with breaker:
        await breaker.disable(KEY)
        for _ in range(10):
            await fail(breaker)
        await fail(breaker, AuthenticationError("denied", status=403))
        assert (await breaker.get_status(KEY)).state is CircuitState.DISABLED
        await succeed(breaker)


def test_key_for() -> None:
    assert CircuitBreaker(per_model=False).key_for("anthropic", "claude-x") == "anthropic"
    per_model = CircuitBreaker()  # per model by default
    assert per_model.key_for("anthropic", "claude-x") == "anthropic:claude-x"
    assert per_model.key_for("anthropic") == "anthropic"
    with pytest.raises(ConfigurationError, match="provider"):
        per_model.key_for("")
    # a key every store can hold: the executor builds it from the registry's names
    with pytest.raises(ConfigurationError, match="NUL"):
        per_model.key_for("openai", "gpt\x00")
    with pytest.raises(ConfigurationError, match="at most 500 characters"):
        per_model.key_for("openai", "m" * 494)


async def test_log_lines_show_a_long_key_cut_short(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    breaker, _ = make(clock)
    key = "openai:" + "m" * 493  # the longest key a breaker takes
    with caplog.at_level(logging.INFO, "empathy_models.breaker"):
        async with breaker:
            await breaker.force_open(key, reason="maintenance")
            await breaker.reset(key)
    lines = [r.getMessage() for r in caplog.records if "'openai:mmm" in r.getMessage()]
    assert len(lines) == 2, lines
    for line in lines:
        assert key not in line and "(500 characters)" in line and len(line) < 200, line


# --------------------------------------------------------------------------- local view


class _NetworkLikeStore(MemoryStateStore):
    """
    A subclass of the memory store: the breaker takes its general path on it (local
    views trusted for ``local_view_ttl``, successes written behind), as on a network
    store.  On `MemoryStateStore` itself every admission reads the stored state and
    every success is added at once, so the staleness bound and the write-behind these
    tests pin can only be seen on a subclass.
    """


async def test_another_breaker_on_the_store_sees_a_trip_within_the_view_ttl(
    clock: FakeClock,
) -> None:
    store = _NetworkLikeStore(clock=clock)
    a = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=1.0)
    b = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=1.0)
    exact = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0)
    async with a, b, exact:
        await succeed(b)
        await succeed(exact)
        for _ in range(3):
            await fail(a)
        clock.advance(0.5)
        await succeed(b)  # b's view is younger than its ttl: still admits locally
        with pytest.raises(CircuitOpenError):
            await exact.admit(KEY)  # ttl 0 always asks the store
        clock.advance(0.5)
        with pytest.raises(CircuitOpenError):
            await b.admit(KEY)  # the view expired: b asked the store and saw the trip
        # exact's success and a's failures counted; b's written-behind successes belonged
        # to the closed generation and were dropped
        status = await store.snapshot(KEY)
        assert status.state is CircuitState.OPEN and status.window_calls == 4


async def test_another_breaker_on_the_memory_store_sees_a_trip_at_once(
    clock: FakeClock,
) -> None:
    store = MemoryStateStore(clock=clock)
    a = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=1.0)
    b = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=1.0)
    async with a, b:
        await succeed(b)
        assert (await store.snapshot(KEY)).window_calls == 1  # in the store at once
        for _ in range(3):
            await fail(a)
        with pytest.raises(CircuitOpenError):
            await b.admit(KEY)  # b's view is no longer the stored state: b reads it
        with pytest.raises(CircuitOpenError):
            async with b.guard(KEY):
                pass  # pragma: no cover
        status = await store.snapshot(KEY)
        assert status.state is CircuitState.OPEN and status.window_calls == 4


async def test_written_behind_successes_reach_the_store_on_interval_and_close(
    clock: FakeClock,
) -> None:
    store = _NetworkLikeStore(clock=clock)  # MemoryStateStore itself writes at once
    breaker = CircuitBreaker(store, POLICY, clock=clock, flush_interval=0.5)
    async with breaker:
        await succeed(breaker)
        for _ in range(3):
            await succeed(breaker)
        assert (await store.snapshot(KEY)).window_calls == 0
        clock.advance(0.5)
        await succeed(breaker)
        assert (await store.snapshot(KEY)).window_calls == 5
        await succeed(breaker)
        await succeed(breaker)
    # aclose flushed the rest; the store was ours, so it is still open
    assert (await store.snapshot(KEY)).window_calls == 7


async def test_closed_breaker_refuses_admission(clock: FakeClock) -> None:
    breaker, _ = make(clock)
    await breaker.aclose()
    with pytest.raises(BackendClosedError):
        await breaker.admit(KEY)


def test_constructor_validation() -> None:
    with pytest.raises(ConfigurationError, match="local_view_ttl must be a finite number >= 0"):
        CircuitBreaker(local_view_ttl=-1)
    with pytest.raises(ConfigurationError, match="flush_interval"):
        CircuitBreaker(flush_interval=0)
    with pytest.raises(ConfigurationError, match="store must be"):
        CircuitBreaker(store=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="policy must be a BreakerPolicy"):
        CircuitBreaker(policy={"consecutive_failures": 1})  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="scheme"):
        CircuitBreaker(store="nosuch://x")


def test_a_window_bucket_under_a_microsecond_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="window bucket"):
        BreakerPolicy(window_seconds=1e-300)
    with pytest.raises(ConfigurationError, match="window bucket"):
        BreakerPolicy(window_seconds=0.5, window_buckets=10**6)


async def test_extreme_but_valid_policy_times_never_raise(clock: FakeClock) -> None:
    # the shortest window bucket: its numbers stay exact
    breaker, _ = make(clock, BreakerPolicy(window_seconds=6e-6, consecutive_failures=1))
    async with breaker:
        await fail(breaker)
        assert (await breaker.get_status(KEY)).state is CircuitState.OPEN
    # an open period beyond what a datetime holds: its latest instant
    endless = BreakerPolicy(
        consecutive_failures=1, recovery_seconds=1e300, max_recovery_seconds=1e300
    )
    breaker, _ = make(clock, endless)
    async with breaker:
        await fail(breaker)
        status = await breaker.get_status(KEY)
        assert status.open_until == datetime.max.replace(tzinfo=UTC)
        assert status.opened_at == clock.as_datetime()
    # a healthy decay so short that any time closed forgets every earlier trip
    forgetful = BreakerPolicy(consecutive_failures=1, healthy_decay_seconds=5e-324)
    breaker, _ = make(clock, forgetful)
    async with breaker:
        await fail(breaker)
        clock.advance(forgetful.recovery_seconds)
        async with breaker.guard(KEY):  # the probe closes it
            pass
        clock.advance(1.0)
        await fail(breaker)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(forgetful.recovery_seconds)


async def test_store_from_url_is_owned_and_closed() -> None:
    breaker = CircuitBreaker("memory://")
    async with breaker:
        await succeed(breaker)
        assert (await breaker.get_status(KEY)).window_calls == 1
    assert breaker.store.closed


class YieldingStore(MemoryStateStore):
    """A memory store whose every operation yields to the event loop, like a real I/O store."""

    shared = True

    async def _transact(self, key, fn):  # type: ignore[no-untyped-def]
        await anyio.lowlevel.checkpoint()
        return await super()._transact(key, fn)


@pytest.mark.parametrize("ttl", [0.0, 1.0])
async def test_lease_is_returned_even_when_the_store_awaits_during_cancellation(
    clock: FakeClock, ttl: float
) -> None:
    store = YieldingStore(clock=clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=ttl)
    async with breaker:
        await _trip_and_wait(breaker, clock)
        with anyio.CancelScope() as scope:
            async with breaker.guard(KEY) as ticket:
                assert ticket.lease_id is not None
                scope.cancel()
                await anyio.sleep(3600)
        assert scope.cancelled_caught
        status = await store.snapshot(KEY)
        assert status.state is CircuitState.HALF_OPEN
        assert status.probes_in_flight == 0


async def test_a_failure_counts_even_when_its_task_is_being_cancelled(clock: FakeClock) -> None:
    store = YieldingStore(clock=clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    async with breaker:
        with anyio.CancelScope() as scope, pytest.raises(ServerError):
            async with breaker.guard(KEY):
                scope.cancel()
                raise ServerError("boom", status=500)
        assert (await store.snapshot(KEY)).failure_count == 1


class Ticker:
    """A ``sleep`` for the breaker's background flusher that returns when the test ticks."""

    def __init__(self) -> None:
        self._go = anyio.Event()

    async def sleep(self, seconds: float) -> None:
        await self._go.wait()
        self._go = anyio.Event()

    def tick(self) -> None:
        self._go.set()


async def test_background_flusher_sends_written_behind_successes(clock: FakeClock) -> None:
    store = YieldingStore(clock=clock)
    ticker = Ticker()
    breaker = CircuitBreaker(store, POLICY, clock=clock, sleep=ticker.sleep)
    async with breaker:
        for _ in range(4):
            await succeed(breaker)
        await anyio.wait_all_tasks_blocked()
        assert (await store.snapshot(KEY)).window_calls == 0
        ticker.tick()
        await anyio.wait_all_tasks_blocked()
        assert (await store.snapshot(KEY)).window_calls == 4
        await succeed(breaker)
        ticker.tick()
        await anyio.wait_all_tasks_blocked()
        assert (await store.snapshot(KEY)).window_calls == 5


async def test_an_absurd_retry_after_neither_replaces_the_error_nor_loses_the_event(
    clock: FakeClock,
) -> None:
    # a Retry-After beyond year 9999 (a buggy or hostile server) opens the circuit for
    # max_retry_after_open only; describing it to listeners must not raise into the call
    events: list[BreakerEvent] = []
    breaker, _ = make(clock, listeners=[events.append])
    cap = breaker.policy.max_retry_after_open
    async with breaker:
        await fail(breaker, RateLimitedError("slow down", status=429, retry_after=1e12))
        [event] = events
        assert event.new_state is CircuitState.OPEN
        assert event.open_until == datetime.fromtimestamp(clock.now + cap, UTC)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(cap)


async def test_an_infinite_retry_after_on_an_exception_does_not_replace_it(
    clock: FakeClock,
) -> None:
    # any exception's ``retry_after`` attribute is read; a non-finite one (a custom
    # provider's "never") must not turn into a RecordValidationError in the caller
    class GiveUp(ServerError):
        pass

    breaker, _ = make(clock)
    async with breaker:
        for _ in range(POLICY.consecutive_failures):
            error = GiveUp("gone", status=503)
            error.retry_after = math.inf
            await fail(breaker, error)
        assert (await breaker.get_status(KEY)).state is CircuitState.OPEN


async def test_a_429_answered_after_the_trip_still_holds_the_circuit_open(
    clock: FakeClock,
) -> None:
    breaker, _ = make(clock, BreakerPolicy(consecutive_failures=1, recovery_seconds=60.0))
    async with breaker:
        slow = await breaker.admit(KEY)  # in flight while another call trips the circuit
        await fail(breaker)
        tripped = await breaker.get_status(KEY)
        assert tripped.state is CircuitState.OPEN
        assert tripped.open_until_ts == clock() + 60.0
        clock.advance(5)
        await breaker.report(slow, Outcome.RATE_LIMITED, retry_after=600.0)
        held = await breaker.get_status(KEY)
        assert held.state is CircuitState.OPEN
        assert held.generation == tripped.generation
        assert held.open_until_ts == clock() + 600.0
        clock.advance(590)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.admit(KEY)
        assert info.value.retry_after == pytest.approx(10.0)
