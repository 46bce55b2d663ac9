"""
`CircuitBreaker.protect` and the CLOSED fast path of `guard`, through the public API.

The fast path serves admissions from the local view and counts successes with one
increment; these tests pin that it behaves exactly like the general path: counts reach
the store, failures trip, a success of a call admitted before the state changed is not
counted in the new state, cancellation counts nothing, and a closed breaker refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AsyncExitStack

import anyio
import pytest
from anyio import wait_all_tasks_blocked

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
)
from empathy_models.backends import MemoryStateStore
from empathy_models.breaker import BreakerEvent
from empathy_models.exceptions import (
    BackendClosedError,
    ConfigurationWarning,
    InvalidRequestError,
    ServerError,
)
from empathy_models.records import Admission, CircuitBreakerState, OutcomeReport
from empathy_models.testing.clock import FakeClock

KEY = "anthropic"
POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=100, recovery_seconds=60.0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class _WriteBehindStore(MemoryStateStore):
    """
    A subclass of the memory store, on which the breaker takes its general path: local
    views and written-behind successes, as on a network store.  On `MemoryStateStore`
    itself a success is added to the stored state at once (nothing to batch), so the
    write-behind tests (the batch cap, the flush interval) run on this class instead.
    """


def make(
    clock: FakeClock, flush_interval: float = 0.5, *, write_behind: bool = False
) -> tuple[CircuitBreaker, MemoryStateStore]:
    store = (_WriteBehindStore if write_behind else MemoryStateStore)(clock=clock)
    return CircuitBreaker(store, POLICY, clock=clock, flush_interval=flush_interval), store


async def test_protect_returns_results_and_counts_successes(clock: FakeClock) -> None:
    breaker, store = make(clock)
    calls: list[tuple[str, int]] = []

    @breaker.protect(KEY)
    async def ask(prompt: str, *, n: int = 1) -> str:
        """Ask."""
        calls.append((prompt, n))
        return prompt.upper() * n

    async with breaker:
        assert ask.__name__ == "ask" and ask.__doc__ == "Ask."
        assert await ask("hi") == "HI"
        for i in range(4):
            assert await ask("x", n=i) == "X" * i
        assert calls == [("hi", 1), ("x", 0), ("x", 1), ("x", 2), ("x", 3)]
        # the memory store itself counts each success at once (no write-behind)
        assert (await store.snapshot(KEY)).window_calls == 5
        status = await breaker.get_status(KEY)
        assert status.window_calls == 5 and status.state is CircuitState.CLOSED


async def test_protect_trips_rejects_and_recovers_like_guard(clock: FakeClock) -> None:
    breaker, store = make(clock)
    ran = 0

    @breaker.protect(KEY)
    async def call(fail: bool) -> None:
        nonlocal ran
        ran += 1
        if fail:
            raise ServerError("boom", status=503)

    async with breaker:
        await call(False)
        for _ in range(3):
            with pytest.raises(ServerError):
                await call(True)
        with pytest.raises(CircuitOpenError) as info:
            await call(False)
        assert ran == 4  # the rejected call never ran
        assert info.value.reason == "3 consecutive failures"
        assert info.value.last_error == "ServerError: boom"
        # after the open period the next call is the probe; its success closes the circuit
        clock.advance(60)
        await call(False)
        assert (await store.snapshot(KEY)).state is CircuitState.CLOSED


async def test_protect_ignored_errors_propagate_and_count_nothing(clock: FakeClock) -> None:
    breaker, _ = make(clock)

    @breaker.protect(KEY)
    async def call() -> None:
        raise InvalidRequestError("bad request", status=400)

    async with breaker:
        await breaker.get_status(KEY)  # a fresh CLOSED view: the fast path is taken
        for _ in range(5):
            with pytest.raises(InvalidRequestError):
                await call()
        status = await breaker.get_status(KEY)
        assert status.state is CircuitState.CLOSED
        assert status.window_calls == 0 and status.failure_count == 0


async def test_protect_cancellation_counts_nothing(clock: FakeClock) -> None:
    breaker, _ = make(clock)

    @breaker.protect(KEY)
    async def slow() -> None:
        await anyio.sleep(3600)

    async with breaker:
        await breaker.get_status(KEY)
        for _ in range(5):
            with anyio.move_on_after(0):
                await slow()
        status = await breaker.get_status(KEY)
        assert status.window_calls == 0 and status.failure_count == 0


async def test_protect_and_guard_refuse_after_aclose(clock: FakeClock) -> None:
    breaker, _ = make(clock)

    @breaker.protect(KEY)
    async def call() -> int:
        return 1

    async with breaker:
        assert await call() == 1  # the view is fresh and CLOSED when the breaker closes
    with pytest.raises(BackendClosedError):
        await call()
    with pytest.raises(BackendClosedError):
        async with breaker.guard(KEY):
            pass  # pragma: no cover


def test_protect_rejects_an_empty_key() -> None:
    with pytest.raises(ConfigurationError, match="non-empty string"):
        CircuitBreaker().protect("")


@pytest.mark.parametrize("style", ["guard", "protect"])
async def test_success_of_a_call_admitted_before_a_trip_is_not_counted_after(
    clock: FakeClock, style: str
) -> None:
    breaker, store = make(clock)
    admitted = anyio.Event()
    tripped = anyio.Event()

    async def body() -> None:
        admitted.set()
        await tripped.wait()

    @breaker.protect(KEY)
    async def protected() -> None:
        await body()

    async def slow_success() -> None:
        if style == "guard":
            async with breaker.guard(KEY) as ticket:
                assert ticket.generation == 0
                await body()
        else:
            await protected()

    async with breaker:
        await breaker.get_status(KEY)  # fresh CLOSED view, generation 0
        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_success)
            await admitted.wait()
            for _ in range(3):
                with pytest.raises(ServerError):
                    async with breaker.guard(KEY):
                        raise ServerError("boom", status=503)
            opened = await store.snapshot(KEY)
            assert opened.state is CircuitState.OPEN and opened.generation == 1
            tripped.set()
        # the success belonged to generation 0: it changes nothing in the open circuit
        assert await store.snapshot(KEY) == opened
        assert await breaker.get_status(KEY) == opened


async def test_batch_cap_flushes_written_behind_successes(clock: FakeClock) -> None:
    breaker, store = make(clock, write_behind=True)

    @breaker.protect(KEY)
    async def call() -> None:
        return None

    async with breaker:
        for _ in range(1000):
            async with breaker.guard(KEY):
                pass
        # the 1,000th waiting success flushed the batch, without any time passing
        assert (await store.snapshot(KEY)).window_calls == 1000
        for _ in range(1000):
            await call()
        assert (await store.snapshot(KEY)).window_calls == 2000


async def test_flush_interval_is_checked_on_the_fast_path(clock: FakeClock) -> None:
    breaker, store = make(clock, flush_interval=0.5, write_behind=True)

    @breaker.protect(KEY)
    async def call() -> None:
        return None

    async with breaker:
        await call()  # first success: starts the batch
        await call()
        await call()
        assert (await store.snapshot(KEY)).window_calls == 0
        clock.advance(0.5)
        await call()  # admitted at the deadline: flushes the batch, itself included
        assert (await store.snapshot(KEY)).window_calls == 4


# ------------------------------------------------------------------------ write-behind durability


class _GatedStore(MemoryStateStore):
    """A shared store whose `record` can be held open, like a slow network store."""

    shared = True

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.hold = False
        self.entered = anyio.Event()
        self.gate = anyio.Event()

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        if self.hold:
            self.entered.set()
            await self.gate.wait()
        return await super().record(key, policy, reports)


async def test_closing_while_the_flusher_writes_keeps_its_batch(clock: FakeClock) -> None:
    store = _GatedStore(clock)
    send, receive = anyio.create_memory_object_stream[None](1)

    async def sleep(_: float) -> None:
        await receive.receive()  # the flusher wakes when the test says so

    breaker = CircuitBreaker(store, POLICY, clock=clock, sleep=sleep)
    async with send, receive, anyio.create_task_group() as tg:
        await breaker.__aenter__()
        for _ in range(3):
            async with breaker.guard(KEY):
                pass
        store.hold = True
        await send.send(None)
        await store.entered.wait()  # the flusher took the batch and is writing it

        async def release_when_closing() -> None:
            await wait_all_tasks_blocked()  # aclose is waiting for the flusher
            store.gate.set()

        tg.start_soon(release_when_closing)
        await breaker.aclose()
    # the batch the flusher had taken was written, not dropped by the cancellation
    assert (await store.snapshot(KEY)).window_calls == 3
    await store.aclose()


# ------------------------------------------------------------------------ answers out of order


class _LateAdmitStore(MemoryStateStore):
    """A store whose next `admit` answer is computed at once but delivered late."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.hold = False
        self.entered = anyio.Event()
        self.gate = anyio.Event()

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        admission = await super().admit(key, policy)
        if self.hold:
            self.hold = False
            self.entered.set()
            await self.gate.wait()  # the reply is on the wire while other calls go on
        return admission


async def test_a_late_store_answer_does_not_replace_a_newer_view(clock: FakeClock) -> None:
    # Two calls in flight on a network store: the first admission's reply (CLOSED,
    # generation 0) arrives after another call's failure tripped the circuit (OPEN,
    # generation 1).  The older reply must not bring the CLOSED view back: the fast
    # path would admit calls for a circuit this very process knows is open.
    store = _LateAdmitStore(clock)
    policy = BreakerPolicy(consecutive_failures=1, minimum_calls=100, recovery_seconds=60.0)
    events: list[BreakerEvent] = []
    breaker = CircuitBreaker(store, policy, clock=clock, listeners=[events.append])
    async with anyio.create_task_group() as tg:
        store.hold = True
        tg.start_soon(breaker.admit, KEY)
        await store.entered.wait()
        with pytest.raises(ServerError):
            async with breaker.guard(KEY):
                raise ServerError("boom", status=503)
        assert (await store.snapshot(KEY)).state is CircuitState.OPEN
        store.gate.set()
    with pytest.raises(CircuitOpenError):
        async with breaker.guard(KEY):
            raise AssertionError("admitted while this process saw the circuit open")
    assert [(e.old_state, e.new_state) for e in events] == [
        (CircuitState.CLOSED, CircuitState.OPEN)
    ]
    await breaker.aclose()
    await store.aclose()


async def test_a_flush_on_the_call_path_survives_the_callers_cancellation(
    clock: FakeClock,
) -> None:
    # the call whose success makes the batch due sends it; when that task is cancelled
    # meanwhile, the batch it took from memory must still reach the store (as the
    # background flusher and report's failures are shielded)
    store = _GatedStore(clock)
    breaker = CircuitBreaker(store, POLICY, clock=clock)  # unentered: no flusher runs
    with pytest.warns(ConfigurationWarning, match="use `async with breaker:`"):
        for _ in range(3):
            async with breaker.guard(KEY):
                pass
    clock.advance(0.6)  # the view is still fresh, the batch is due

    async def one_more() -> None:
        async with breaker.guard(KEY):
            pass

    store.hold = True
    async with anyio.create_task_group() as tg:
        tg.start_soon(one_more)
        await store.entered.wait()  # the batch of 4 is being written
        tg.cancel_scope.cancel()
        store.gate.set()
    store.hold = False
    assert (await store.snapshot(KEY)).window_calls == 4
    await breaker.aclose()
    await store.aclose()


@pytest.mark.parametrize("write_behind", [False, True])
async def test_a_guard_entered_by_an_exit_stack_acts_as_with_async_with(
    clock: FakeClock, write_behind: bool
) -> None:
    # the CLOSED path answers __aenter__ / __aexit__ with completed futures, not
    # coroutines: the protocol's other users see the same values and exceptions
    breaker, store = make(clock, write_behind=write_behind)
    async with breaker:
        for _ in range(3):  # the first admission asks the store, the others its view
            async with AsyncExitStack() as stack:
                ticket = await stack.enter_async_context(breaker.guard(KEY))
                assert ticket.key == KEY
        guard = breaker.guard(KEY)
        assert (await guard.__aenter__()).key == KEY
        assert await guard.__aexit__(None, None, None) is None  # type: ignore[func-returns-value]
        await breaker.flush()
        assert (await store.snapshot(KEY)).window_calls == 4
        for _ in range(3):
            with pytest.raises(ServerError):
                async with AsyncExitStack() as stack:
                    await stack.enter_async_context(breaker.guard(KEY))
                    raise ServerError("boom", status=503)
        assert (await store.snapshot(KEY)).state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            async with AsyncExitStack() as stack:
                await stack.enter_async_context(breaker.guard(KEY))
