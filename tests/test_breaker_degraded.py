"""
Degraded mode: when the shared store fails, calls go on with a per-process breaker of
the same policy, one ``store_degraded`` event and one warning per outage; on recovery
the store's state (an OPEN set meanwhile included) is adopted.

The store here is a real `CircuitStateStore` (a memory store behind a switch) that
raises like an unreachable database would; the breaker under test is not mocked.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState, Outcome
from empathy_models.abc import CircuitStateStore
from empathy_models.backends import MemoryStateStore
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.breaker import BreakerEvent, BreakerEventKind
from empathy_models.exceptions import ServerError, StateStoreError
from empathy_models.records import Admission, CircuitBreakerState, OutcomeReport
from empathy_models.testing.clock import FakeClock

KEY = "anthropic"
POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=100, recovery_seconds=60.0)


class SwitchableStore(CircuitStateStore):
    """A shared store that answers from memory while up and raises ``error`` while down."""

    shared = True

    def __init__(self, clock: FakeClock) -> None:
        self.inner = MemoryStateStore(clock=clock)
        self.error: BaseException | None = None
        self.hang = False
        # set: a hung operation, once cancelled, cleans up until this is set (asyncpg
        # waits for the server to confirm a cancel request before it gives a
        # connection back to its pool)
        self.cleanup: anyio.Event | None = None
        self.attempts = 0

    async def _gate(self) -> None:
        self.attempts += 1
        await anyio.lowlevel.checkpoint()  # a real store suspends on I/O
        if self.hang:
            try:
                await anyio.sleep_forever()
            finally:
                if self.cleanup is not None:
                    with anyio.CancelScope(shield=True):
                        await self.cleanup.wait()
        if self.error is not None:
            raise self.error

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        await self._gate()
        return await self.inner.admit(key, policy)

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        await self._gate()
        return await self.inner.record(key, policy, reports)

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        await self._gate()
        return await self.inner.force(
            key, state, until=until, reason=reason, for_seconds=for_seconds
        )

    async def snapshot(self, key: str) -> CircuitBreakerState:
        await self._gate()
        return await self.inner.snapshot(key)

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        await self._gate()
        return await self.inner.snapshot_all()

    async def reset(self, key: str | None = None) -> None:
        await self._gate()
        await self.inner.reset(key)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def is_degraded(breaker: CircuitBreaker) -> bool:
    return breaker.degraded


async def succeed(breaker: CircuitBreaker) -> None:
    async with breaker.guard(KEY):
        pass


async def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(ServerError):
        async with breaker.guard(KEY):
            raise ServerError("boom", status=503)


@pytest.mark.parametrize(
    "error",
    [
        StateStoreError("database is locked", target="state.db"),
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError("store timed out"),
        OSError(13, "Permission denied"),
    ],
    ids=["StateStoreError", "ConnectionError", "TimeoutError", "OSError"],
)
async def test_calls_go_on_with_one_event_and_one_warning_per_outage(
    clock: FakeClock, error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    store = SwitchableStore(clock)
    store.error = error
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(store, POLICY, clock=clock, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="empathy_models.breaker"):
        async with breaker:
            for _ in range(20):
                await succeed(breaker)
                clock.advance(0.3)
            assert breaker.degraded
            # the fallback applies the same policy: three failures trip it
            for _ in range(3):
                await fail(breaker)
            with pytest.raises(CircuitOpenError):
                await succeed(breaker)
    degraded = [e for e in events if e.kind is BreakerEventKind.STORE_DEGRADED]
    assert len(degraded) == 1
    assert degraded[0].key == KEY
    assert degraded[0].error is not None and type(error).__name__ in degraded[0].error
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    store_warnings = [text for text in warnings if "circuit state store" in text]
    assert len(store_warnings) == 1 and "per-process breaker" in store_warnings[0]
    [trip] = [text for text in warnings if text not in store_warnings]  # the trip itself
    assert f"circuit {KEY!r} opened" in trip and "3 consecutive failures" in trip
    assert [(e.old_state, e.new_state) for e in events if e.new_state is not None] == [
        (CircuitState.CLOSED, CircuitState.OPEN)
    ]


async def test_the_store_is_retried_at_most_every_retry_interval(clock: FakeClock) -> None:
    store = SwitchableStore(clock)
    store.error = StateStoreError("down")
    breaker = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0, store_retry_interval=5.0)
    async with breaker:
        for _ in range(100):
            await succeed(breaker)  # ttl 0: two store operations per call
            clock.advance(0.25)
        # 25 s of calls: the first attempt, then one retry per 5 s (at 5, 10, 15 and 20 s)
        assert store.attempts == 5
        assert breaker.degraded


async def test_recovery_adopts_an_open_set_meanwhile(clock: FakeClock) -> None:
    store = SwitchableStore(clock)
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(
        store, POLICY, clock=clock, store_retry_interval=5.0, listeners=[events.append]
    )
    async with breaker:
        await succeed(breaker)
        store.error = ConnectionResetError(104, "Connection reset by peer")
        clock.advance(1.0)
        await succeed(breaker)  # the view expired: the store is asked, fails, fallback answers
        assert breaker.degraded
        # meanwhile another process trips the circuit in the store
        await store.inner.force(KEY, CircuitState.FORCED_OPEN, reason="tripped elsewhere")
        store.error = None
        clock.advance(1.0)
        await succeed(breaker)  # still within the retry interval: the fallback admits
        clock.advance(5.0)
        with pytest.raises(CircuitOpenError) as info:
            await succeed(breaker)
        assert info.value.reason == "tripped elsewhere"
        assert not is_degraded(breaker)
        assert not breaker.available_hint(KEY)
    kinds = [e.kind for e in events]
    assert kinds.count(BreakerEventKind.STORE_DEGRADED) == 1
    assert kinds.count(BreakerEventKind.STORE_RECOVERED) == 1
    assert kinds.index(BreakerEventKind.STORE_DEGRADED) < kinds.index(
        BreakerEventKind.STORE_RECOVERED
    )
    changed = [e for e in events if e.kind is BreakerEventKind.STATE_CHANGED]
    assert [(e.old_state, e.new_state) for e in changed] == [
        (CircuitState.CLOSED, CircuitState.FORCED_OPEN)
    ]


async def test_an_open_circuit_stays_open_when_the_store_goes_down(clock: FakeClock) -> None:
    store = SwitchableStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    async with breaker:
        for _ in range(3):
            await fail(breaker)
        store.error = StateStoreError("down")
        clock.advance(30)  # the view is stale; the store fails; the fallback knows it is open
        with pytest.raises(CircuitOpenError) as info:
            await succeed(breaker)
        assert info.value.state is CircuitState.OPEN
        assert info.value.retry_after == pytest.approx(30.0)
        assert breaker.degraded
        clock.advance(30)  # the recovery time passes while degraded: the fallback probes
        await succeed(breaker)
        assert (await breaker.get_status(KEY)).state is CircuitState.CLOSED


async def test_a_failure_reported_while_the_store_is_down_never_raises_a_store_error(
    clock: FakeClock,
) -> None:
    store = SwitchableStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock, local_view_ttl=0)
    async with breaker:
        with pytest.raises(ServerError):
            async with breaker.guard(KEY):
                store.error = StateStoreError("went away mid-call")
                raise ServerError("boom", status=502)
        assert breaker.degraded
        status = await breaker.get_status(KEY)  # from the fallback
        assert status.failure_count == 1


async def test_written_behind_successes_survive_an_outage_at_close(clock: FakeClock) -> None:
    store = SwitchableStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)
    async with breaker:
        for _ in range(5):
            await succeed(breaker)
        store.error = StateStoreError("down at shutdown")
    # aclose flushed into the fallback instead of raising
    assert breaker.closed
    assert (await store.inner.snapshot(KEY)).window_calls == 0


async def test_control_calls_while_the_store_is_down_raise_and_change_nothing(
    clock: FakeClock,
) -> None:
    store = SwitchableStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock, store_retry_interval=60.0)
    async with breaker:
        await breaker.force_open("other", reason="before the outage")
        store.error = StateStoreError("down")
        for control in (
            lambda: breaker.force_open(KEY, reason="ops"),
            lambda: breaker.disable(KEY),
            lambda: breaker.reset(KEY),
            lambda: breaker.reset(),
        ):
            with pytest.raises(StateStoreError, match=r"not applied.*store is unreachable"):
                await control()
        # this process goes on as before: the key admits, the other stays forced open
        await succeed(breaker)
        assert breaker.degraded
        assert await breaker.is_available(KEY)
        assert not await breaker.is_available("other")
        assert sorted(s.key for s in await breaker.snapshot()) == [KEY, "other"]
        store.error = None  # back, and nothing applied late
        assert (await store.inner.snapshot(KEY)).state is CircuitState.CLOSED
        assert (await store.inner.snapshot("other")).state is CircuitState.FORCED_OPEN


async def test_a_control_call_reaching_the_store_again_is_applied_and_ends_the_outage(
    clock: FakeClock,
) -> None:
    store = SwitchableStore(clock)
    store.error = StateStoreError("down")
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(
        store, POLICY, clock=clock, store_retry_interval=60.0, listeners=[events.append]
    )
    async with breaker:
        await succeed(breaker)
        assert breaker.degraded
        store.error = None  # back before the next retry is due: the control call goes there
        forced = await breaker.force_open(KEY, reason="ops")
        assert forced.state is CircuitState.FORCED_OPEN
        assert (await store.inner.snapshot(KEY)).state is CircuitState.FORCED_OPEN
        assert not is_degraded(breaker)
        with pytest.raises(CircuitOpenError):
            await succeed(breaker)
        await breaker.reset(KEY)
        assert (await store.inner.snapshot(KEY)).state is CircuitState.CLOSED
        await succeed(breaker)
    kinds = [e.kind for e in events]
    assert kinds[:2] == [BreakerEventKind.STORE_DEGRADED, BreakerEventKind.STORE_RECOVERED]


async def test_a_hung_store_counts_as_down_after_store_timeout(clock: FakeClock) -> None:
    store = SwitchableStore(clock)
    store.hang = True
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(
        store, POLICY, clock=clock, store_timeout=0.05, listeners=[events.append]
    )
    async with breaker:
        await succeed(breaker)
        assert breaker.degraded
    assert [e.kind for e in events] == [BreakerEventKind.STORE_DEGRADED]
    assert events[0].error is not None and events[0].error.startswith("TimeoutError")


async def test_a_hung_store_slow_to_clean_up_still_holds_a_call_only_store_timeout(
    clock: FakeClock,
) -> None:
    store = SwitchableStore(clock)
    store.hang = True
    store.cleanup = anyio.Event()  # the cleanup ends only after the call has returned
    breaker = CircuitBreaker(store, POLICY, clock=clock, store_timeout=0.05)
    async with breaker:
        with anyio.fail_after(10):
            await succeed(breaker)
        assert breaker.degraded
        store.cleanup.set()


async def test_concurrent_calls_degrade_once(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    store = SwitchableStore(clock)
    store.error = StateStoreError("down")
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(store, POLICY, clock=clock, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="empathy_models.breaker"):
        async with breaker, anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(succeed, breaker, name=f"call {i}")
    assert [e.kind for e in events] == [BreakerEventKind.STORE_DEGRADED]
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


async def test_an_error_text_no_store_can_encode_still_counts(tmp_path: Path) -> None:
    # an exception message with a lone surrogate (text decoded with surrogateescape):
    # the store cannot encode it as UTF-8; the failure must still count, the caller's
    # exception must come through unchanged, and the store is not "down"
    events: list[BreakerEvent] = []
    store = SQLiteStateStore(tmp_path / "state.db")
    policy = BreakerPolicy(consecutive_failures=1)
    async with store, CircuitBreaker(store, policy, listeners=[events.append]) as breaker:
        with pytest.raises(ServerError):
            async with breaker.guard("k"):
                raise ServerError("bad byte \udcff in body", status=503)
        state = await breaker.get_status("k")
        assert state.state is CircuitState.OPEN
        assert state.last_error == "ServerError: bad byte \\udcff in body"
        await breaker.reset("k")
        ticket = await breaker.admit("k")
        await breaker.report(ticket, Outcome.FAILURE, error="\udcff")  # the public form
        assert (await breaker.get_status("k")).last_error == "\\udcff"
        assert not breaker.degraded
    assert BreakerEventKind.STORE_DEGRADED not in {e.kind for e in events}


class _SlowRetryStore(SwitchableStore):
    """Down; the next snapshot waits for ``release`` and then fails."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock)
        self.slow = False
        self.entered = anyio.Event()
        self.release = anyio.Event()

    async def snapshot(self, key: str) -> CircuitBreakerState:
        if self.slow:
            self.slow = False
            self.entered.set()
            await self.release.wait()
            raise ConnectionResetError(104, "Connection reset by peer")
        return await super().snapshot(key)


async def test_a_retry_failing_after_another_task_recovered_does_not_raise(
    clock: FakeClock,
) -> None:
    # task A retries the store and hangs; a retry interval later task B retries, the
    # store answers and the fallback is closed; then A's attempt fails.  A must go on
    # (degraded again), not use the fallback B closed and raise BackendClosedError
    store = _SlowRetryStore(clock)
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(
        store, POLICY, clock=clock, store_retry_interval=5.0, listeners=[events.append]
    )
    async with breaker:
        store.error = StateStoreError("down")
        await fail(breaker)
        assert breaker.degraded
        clock.advance(5.0)
        store.error = None
        store.slow = True
        async with anyio.create_task_group() as tg:
            tg.start_soon(breaker.get_status, KEY)  # A: the retry that hangs, then fails
            await store.entered.wait()
            clock.advance(5.0)
            await breaker.get_status(KEY)  # B: the next retry, which succeeds
            assert not is_degraded(breaker)
            store.release.set()
        assert is_degraded(breaker)  # A's failure is a new outage
    kinds = [e.kind for e in events if e.kind is not BreakerEventKind.STATE_CHANGED]
    assert kinds == [
        BreakerEventKind.STORE_DEGRADED,
        BreakerEventKind.STORE_RECOVERED,
        BreakerEventKind.STORE_DEGRADED,
    ]
