"""
A shared store that stalls (a partitioned Redis or PostgreSQL, a SQLite file another
process holds locked) neither fails calls it need not fail nor holds them past their
deadline: the response cache is skipped, the limiter and the breaker give up at the
run's deadline, and an attempt whose deadline ran out before it was sent is recorded as
not sent, never as the model's failure.

The stores here are the library's in-process stores behind a gate the test opens: a
store operation waits until then (a store that does not answer).  Each run is guarded
by a generous `asyncio.wait_for` so that a regression fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import attrs
import pytest

from empathy_models import (
    AllRoutesFailedError,
    Budget,
    CircuitBreaker,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelRegistry,
    StreamInterruptedError,
)
from empathy_models._cached import STORE_TIMEOUT
from empathy_models.backends import MemoryStateStore, MemoryTelemetryBackend
from empathy_models.cache import MemoryResponseCache
from empathy_models.circuit import BreakerPolicy
from empathy_models.limits import DeadlineRanOut, Limiter, MemoryQuotaStore
from empathy_models.limits.values import BudgetGrant, BudgetUsage
from empathy_models.records import Admission, Outcome
from empathy_models.testing import FakeClock, FakeLLMServer, ModelBehavior, StreamBehavior

from ._fakes import KEY, http_executor, priced_registry

REGISTRY = priced_registry([("gpt-a", 1.0)], "stalls-test-1")
GUARD = 30.0  # seconds before a run that should have returned counts as hung


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer({"gpt-a": ModelBehavior(content="ok")}, api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    return http_executor(server, REGISTRY, **options)


class Gate:
    """Store operations wait at the gate until the test opens it."""

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.waiting = 0

    async def wait(self) -> None:
        self.waiting += 1
        await self.opened.wait()


class StalledCache(MemoryResponseCache):
    def __init__(self, gate: Gate, *, reads: bool = True, writes: bool = True) -> None:
        super().__init__()
        self.gate = gate
        self.reads = reads
        self.writes = writes

    async def get(self, key: str) -> bytes | None:
        if self.reads:
            await self.gate.wait()
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if self.writes:
            await self.gate.wait()
        await super().set(key, value, ttl)


class StalledQuota(MemoryQuotaStore):
    """A quota store whose reservations (or settlements) wait at the gate."""

    def __init__(self, gate: Gate, *, reserves: bool = True, settles: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.reserves = reserves
        self.settles = settles

    async def reserve(self, key: str, **kw: Any) -> BudgetGrant:
        if self.reserves:
            await self.gate.wait()
        return await super().reserve(key, **kw)

    async def settle(self, key: str, **kw: Any) -> BudgetUsage:
        if self.settles:
            await self.gate.wait()
        return await super().settle(key, **kw)


class StalledState(MemoryStateStore):
    """
    A state store the breaker treats as remote (it does I/O) whose admissions (or
    outcome reports) wait at the gate.
    """

    def __init__(self, gate: Gate, *, admissions: bool = True, records: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.admissions = admissions
        self.records = records

    @property
    def in_process(self) -> bool:
        return False

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        if self.admissions:
            await self.gate.wait()
        return await super().admit(key, policy)

    async def record(self, key: str, policy: BreakerPolicy, reports: Any) -> Any:
        if self.records:
            await self.gate.wait()
        return await super().record(key, policy, reports)


def reports_stalled(gate: Gate, **options: Any) -> CircuitBreaker:
    """A breaker whose outcome reports wait at ``gate`` (its admissions do not)."""
    return CircuitBreaker(
        store=StalledState(gate, admissions=False, records=True), store_timeout=None, **options
    )


Ask = Callable[[EmpathyLLMExecutor, str, float], Awaitable[str]]
"""Asks an executor a prompt within a deadline (run or stream): the answer's text."""


async def answered_while_reports_stall(server: FakeLLMServer, ask: Ask) -> tuple[str, int]:
    """
    ``ask`` twice through an executor whose breaker's reports stall: the first run's
    success is written behind (within a generous deadline); once that write is due, the
    second run (a 3 s deadline, which its call does not reach on a busy machine) answers
    at its deadline while its report waits.  Its answer, and the reports waiting at the
    gate when it came back.
    """
    gate = Gate()
    clock = FakeClock()
    async with (
        reports_stalled(gate, clock=clock) as breaker,
        make(server, breaker=breaker) as executor,
    ):
        try:
            await asyncio.wait_for(ask(executor, "one", 30.0), GUARD)
            clock.advance(0.7)  # the success written behind is due (the view is still fresh)
            answer = await asyncio.wait_for(ask(executor, "two", 3.0), GUARD)
            waiting = gate.waiting  # the report waits at the gate; the answer did not
        finally:
            gate.opened.set()  # the report lands; aclose waits for it
    return answer, waiting


CACHED = ExecutionContext(temperature=0, cache_ttl=60)


@pytest.mark.parametrize("deadline", [None, 30.0])
async def test_a_stalled_cache_store_neither_fails_nor_holds_calls(
    server: FakeLLMServer, deadline: float | None
) -> None:
    gate = Gate()
    ctx = attrs.evolve(CACHED, deadline=deadline)
    async with make(server, cache=StalledCache(gate)) as executor:
        answers = [await asyncio.wait_for(executor.run("hello", ctx), GUARD) for _ in range(3)]
        errors, skipped = executor.cache_errors, executor.cache_skipped
        gate.opened.set()  # the read given up on ends; aclose waits for it
    assert [a.content for a in answers] == ["ok"] * 3
    assert server.requests() == 3
    # the first read timed out: the cache is degraded, the rest skip it
    assert (errors, skipped) == (1, 5)


async def test_a_deadline_is_kept_while_the_cache_store_stalls(server: FakeLLMServer) -> None:
    # the read is waited for half the deadline (0.9 s, less than the store's time): the
    # call has the rest, on a connection the first (uncached) run opened
    gate = Gate()
    async with make(server, cache=StalledCache(gate)) as executor:
        await asyncio.wait_for(executor.run("warm up", ExecutionContext()), GUARD)
        answer = await asyncio.wait_for(
            executor.run("hello", attrs.evolve(CACHED, deadline=1.8)), GUARD
        )
        gate.opened.set()
    assert answer.content == "ok" and not answer.cached


async def test_a_read_cut_short_by_one_runs_deadline_leaves_the_cache_in_use(
    server: FakeLLMServer,
) -> None:
    # the store answers within its own time (STORE_TIMEOUT), only later than a run with
    # a tight deadline waits for it: that run misses, and the cache is not degraded
    gate = Gate()
    async with make(server, cache=StalledCache(gate)) as executor:
        # the call has what the read left of the deadline, on a connection the first
        # (uncached) run opened
        await asyncio.wait_for(executor.run("warm up", ExecutionContext()), GUARD)
        hurried = attrs.evolve(CACHED, deadline=1.0)  # waits 0.5 s for the read
        running = asyncio.ensure_future(executor.run("hello", hurried))
        with anyio.fail_after(GUARD):
            await server.wait_for_requests(2)  # it gave up on the read and asked
        gate.opened.set()  # the read answers, within the store's time
        first = await asyncio.wait_for(running, GUARD)
        await asyncio.sleep(STORE_TIMEOUT)  # a read still out now would be late
        second = await asyncio.wait_for(executor.run("hello", CACHED), GUARD)
        errors, skipped = executor.cache_errors, executor.cache_skipped
    assert not first.cached and second.cached
    assert (errors, skipped) == (0, 0)


async def test_a_read_still_out_after_the_stores_time_counts_once_the_time_is_up(
    server: FakeLLMServer,
) -> None:
    gate = Gate()
    async with make(server, cache=StalledCache(gate, writes=False)) as executor:
        # the call has what the read left of the deadline (0.4 s), on a connection the
        # first (uncached) run opened
        await asyncio.wait_for(executor.run("warm up", ExecutionContext()), GUARD)
        await asyncio.wait_for(executor.run("hello", attrs.evolve(CACHED, deadline=0.8)), GUARD)
        before = executor.cache_errors  # the run stopped waiting; the store's time runs on
        await asyncio.sleep(STORE_TIMEOUT)
        after, skipped = executor.cache_errors, executor.cache_skipped
        await asyncio.wait_for(executor.run("hello", CACHED), GUARD)
        gate.opened.set()
    assert (before, after) == (0, 1)
    # degraded: the next run skips the store, for its read and its answer's write
    assert executor.cache_skipped == skipped + 2


async def _at_gate(gate: Gate) -> None:
    # a write behind reaches the gate within a few turns of the loop
    for _ in range(100):
        if gate.waiting:
            return
        await asyncio.sleep(0)
    raise AssertionError("the write behind never reached the gate")


async def test_an_answer_is_written_to_the_cache_behind(server: FakeLLMServer) -> None:
    gate = Gate()
    cache = StalledCache(gate, reads=False)
    async with make(server, cache=cache) as executor:
        first = await asyncio.wait_for(executor.run("hello", CACHED), GUARD)
        await _at_gate(gate)  # the answer came back with the gate shut: its write waits
        assert gate.waiting == 1
        gate.opened.set()
    # aclose waited for the write behind
    async with make(server, cache=cache) as executor:
        again = await executor.run("hello", CACHED)
    assert not first.cached and again.cached and server.requests() == 1


async def test_a_clear_is_not_undone_by_an_answer_written_behind(server: FakeLLMServer) -> None:
    # the answer's write is under way (at the gate) when the cache is cleared: this
    # process does not read it back, and it is not in the store once the write is done
    gate = Gate()
    cache = StalledCache(gate, reads=False)
    async with make(server, cache=cache) as executor:
        await asyncio.wait_for(executor.run("hello", CACHED), GUARD)
        await _at_gate(gate)
        assert await cache.clear() == 0
        again = await asyncio.wait_for(executor.run("hello", CACHED), GUARD)
        gate.opened.set()
    assert not again.cached and server.requests() == 2
    assert await cache.clear() == 1  # the second answer's; the first one's is gone


async def test_closing_one_executor_keeps_what_another_writes_to_a_shared_cache(
    server: FakeLLMServer,
) -> None:
    # two executors borrow one cache; one closes while the other's write is under way
    gate = Gate()
    cache = StalledCache(gate, reads=False)
    async with make(server, cache=cache) as writer:
        await asyncio.wait_for(writer.run("hello", CACHED), GUARD)
        await _at_gate(gate)
        async with make(server, cache=cache):
            pass
        again = await asyncio.wait_for(writer.run("hello", CACHED), GUARD)
        gate.opened.set()
    async with make(server, cache=cache) as reader:
        later = await reader.run("hello", CACHED)
    assert again.cached and later.cached and server.requests() == 1


async def test_a_deadline_is_kept_while_the_quota_store_stalls(server: FakeLLMServer) -> None:
    gate = Gate()
    store = StalledQuota(gate)
    budget = Budget(limit_usd=10, window="day", name="stall")
    telemetry = MemoryTelemetryBackend()
    async with make(
        server, quota_store=store, budgets=[budget], telemetry_store=telemetry
    ) as executor:
        with pytest.raises(AllRoutesFailedError, match="deadline") as raised:
            await asyncio.wait_for(executor.run("hello", ExecutionContext(deadline=0.5)), GUARD)
        gate.opened.set()  # the reservation lands now, and is given back
    assert "waiting for the quota store" in str(raised.value.exceptions[0])
    assert "waiting for the quota store" in str(raised.value)  # what a log line shows
    assert server.requests() == 0
    await _assert_one_not_sent(telemetry, "waiting for the quota store")
    [usage] = await store.usages()
    assert usage.reserved > 0 and (usage.reserved, usage.held) == (usage.released, 0)


async def test_a_deadline_is_kept_while_the_breaker_store_stalls(server: FakeLLMServer) -> None:
    gate = Gate()
    telemetry = MemoryTelemetryBackend()
    async with (
        CircuitBreaker(store=StalledState(gate), store_timeout=None) as breaker,
        make(server, breaker=breaker, telemetry_store=telemetry) as executor,
    ):
        with pytest.raises(AllRoutesFailedError, match="deadline") as raised:
            await asyncio.wait_for(executor.run("hello", ExecutionContext(deadline=0.5)), GUARD)
        gate.opened.set()  # the admission lands; its lease, if any, comes back
    assert "circuit breaker's store" in str(raised.value.exceptions[0])
    assert server.requests() == 0
    await _assert_one_not_sent(telemetry, "circuit breaker's store")


async def _assert_one_not_sent(telemetry: MemoryTelemetryBackend, why: str) -> None:
    """
    The run that ran out of time before its call was sent left one record of it:
    ``not_sent`` (no model's failure), saying what it waited for.
    """
    [record] = await telemetry.recent(limit=10)
    assert (record.outcome, record.model, record.attempt) == (Outcome.NOT_SENT, "gpt-a", 1)
    assert record.error_type == "ProviderTimeoutError" and why in (record.error_message or "")


async def test_a_deadline_that_ran_out_waiting_for_a_provider_slot_is_recorded_not_sent(
    server: FakeLLMServer,
) -> None:
    # the only slot is held by a call the server keeps for 2 s; a second call whose
    # deadline (0.3 s) runs out while it waits for that slot leaves a record of it
    server.set_behavior("gpt-a", ModelBehavior(content="ok", latency=2_000))
    telemetry = MemoryTelemetryBackend()
    async with make(server, telemetry_store=telemetry, concurrency_per_provider=1) as executor:
        first = asyncio.ensure_future(executor.run("slow", ExecutionContext(stage="first")))
        with anyio.fail_after(GUARD):  # until the first call holds the slot
            while server.requests() == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        with pytest.raises(AllRoutesFailedError, match="deadline") as raised:
            await asyncio.wait_for(
                executor.run("hello", ExecutionContext(stage="second", deadline=0.3)), GUARD
            )
        assert "waiting for a openai slot" in str(raised.value.exceptions[0])
        assert "waiting for a openai slot" in str(raised.value)
        second = [r for r in await telemetry.recent(limit=10) if r.stage == "second"]
        await asyncio.wait_for(first, GUARD)
    assert server.requests() == 1
    assert [(r.outcome, r.attempt) for r in second] == [(Outcome.NOT_SENT, 1)]
    assert "waiting for a openai slot" in (second[0].error_message or "")


async def test_a_deadline_that_ran_out_before_sending_is_not_the_models_failure(
    server: FakeLLMServer,
) -> None:
    clock = FakeClock()

    class SlowQuota(MemoryQuotaStore):
        async def reserve(self, key: str, **kw: Any) -> BudgetGrant:
            clock.advance(3.0)  # the store took 3 s of the run's 2
            return await super().reserve(key, **kw)

    telemetry = MemoryTelemetryBackend()
    async with (
        CircuitBreaker(store="memory://") as breaker,
        make(
            server,
            clock=clock,
            breaker=breaker,
            telemetry_store=telemetry,
            quota_store=SlowQuota(),
            budgets=[Budget(limit_usd=10, window="day", name="slow")],
        ) as executor,
    ):
        with pytest.raises(AllRoutesFailedError, match="deadline") as raised:
            await executor.run("hello", ExecutionContext(deadline=2.0, timeout=1.0))
        status = await breaker.get_status(breaker.key_for("openai", "gpt-a"))
    assert server.requests() == 0
    [record] = await telemetry.recent(limit=10)
    assert record.outcome is Outcome.NOT_SENT
    message = str(raised.value.exceptions[0])
    assert "before the call to openai/gpt-a was sent" in message and "within -" not in message
    assert (status.consecutive_failures, status.window_failures) == (0, 0)


async def test_a_quota_store_stalling_past_short_deadlines_is_left_for_a_while() -> None:
    gate = Gate()
    budget = Budget(limit_usd=10, window="day", name="short")
    limiter = Limiter([budget], None, StalledQuota(gate), store_timeout=0.2)
    await limiter.open()
    try:
        with pytest.raises(DeadlineRanOut):
            await asyncio.wait_for(limiter.admit(None, REGISTRY.get("gpt-a"), 10, 10, 0.05), GUARD)
        # the reservation given up on at the deadline has not ended within the store's
        # timeout: a store failure, so the limiter is degraded (it never would be if
        # every deadline were shorter than the store's timeout)
        for _ in range(int(GUARD / 0.05)):
            if limiter.degraded:
                break
            await asyncio.sleep(0.05)
        hold = await asyncio.wait_for(
            limiter.admit(None, REGISTRY.get("gpt-a"), 10, 10, 0.05), GUARD
        )
        assert hold is not None and limiter.degraded_events == 1
        await limiter.settle(hold)
    finally:
        gate.opened.set()
        await limiter.aclose()


async def test_an_answer_is_not_held_past_the_deadline_by_the_breakers_report(
    server: FakeLLMServer,
) -> None:
    async def run(executor: EmpathyLLMExecutor, prompt: str, deadline: float) -> str:
        return (await executor.run(prompt, ExecutionContext(deadline=deadline))).content

    answer, waiting = await answered_while_reports_stall(server, run)
    assert answer == "ok" and server.requests() == 2 and waiting >= 1


async def _failures(breaker: CircuitBreaker) -> int:
    status = await breaker.get_status(breaker.key_for("openai", "gpt-a"))
    return status.consecutive_failures


async def test_a_failed_attempt_is_not_held_past_the_deadline_by_the_breakers_report(
    server: FakeLLMServer,
) -> None:
    server.set_behavior("gpt-a", ModelBehavior.always(500))
    gate = Gate()
    async with reports_stalled(gate) as breaker:
        async with make(server, breaker=breaker) as executor:
            try:
                with pytest.raises(AllRoutesFailedError):
                    await asyncio.wait_for(
                        executor.run("hello", ExecutionContext(deadline=2.0)), GUARD
                    )
                waiting = gate.waiting  # the failure waits at the gate; the run did not
            finally:
                gate.opened.set()  # the failure lands; aclose waits for it
        failures = await _failures(breaker)
    assert server.requests() == 1 and waiting == 1
    assert failures == 1  # counted, once the store answered


async def test_a_failed_attempt_falls_back_without_waiting_for_a_stalled_breaker_report(
    server: FakeLLMServer,
) -> None:
    """
    The first route fails while the breaker store stalls: the next route answers within
    the deadline instead of the run waiting for the report until the deadline.
    """
    second = attrs.evolve(REGISTRY.models[0], id="gpt-b", input_price_per_mtok=2.0)
    registry = ModelRegistry(models=[*REGISTRY.models, second], price_version="stalls-test-2")
    server.set_behavior("gpt-a", ModelBehavior.always(500))
    server.set_behavior("gpt-b", ModelBehavior(content="from b"))
    gate = Gate()
    async with reports_stalled(gate) as breaker:
        async with http_executor(server, registry, breaker=breaker) as executor:
            try:
                answer = await asyncio.wait_for(
                    executor.run("hello", ExecutionContext(tier="cheap", deadline=4.0)), GUARD
                )
                waiting = gate.waiting  # the failure's report waits at the gate
            finally:
                gate.opened.set()
        failures = await _failures(breaker)
    assert answer.content == "from b" and answer.fallback_chain == ("gpt-a", "gpt-b")
    assert waiting >= 1 and failures == 1  # counted, once the store answered


async def test_an_interrupted_stream_is_not_held_past_the_deadline_by_the_breakers_report(
    server: FakeLLMServer,
) -> None:
    stream_behavior = StreamBehavior(fault_after=1, fault="error")
    server.set_behavior("gpt-a", ModelBehavior(content="one two three", stream=stream_behavior))
    gate = Gate()

    async def read() -> list[str]:
        deltas: list[str] = []
        async with executor.stream("hello", ExecutionContext(deadline=2.0)) as stream:
            async for delta in stream:
                deltas.append(delta)  # noqa: PERF401 - keeps the deltas before the error
        return deltas

    async with reports_stalled(gate) as breaker:
        async with make(server, breaker=breaker) as executor:
            try:
                with pytest.raises(StreamInterruptedError):
                    await asyncio.wait_for(read(), GUARD)
                waiting = gate.waiting
            finally:
                gate.opened.set()
        failures = await _failures(breaker)
    assert server.requests() == 1 and waiting == 1
    assert failures == 1


async def test_a_streamed_answer_is_not_held_past_the_deadline_by_the_breakers_report(
    server: FakeLLMServer,
) -> None:
    async def read(executor: EmpathyLLMExecutor, prompt: str, deadline: float) -> str:
        async with executor.stream(prompt, ExecutionContext(deadline=deadline)) as stream:
            return "".join([delta async for delta in stream if isinstance(delta, str)])

    text, waiting = await answered_while_reports_stall(server, read)
    assert text == "ok" and server.requests() == 2 and waiting >= 1


async def test_a_streams_settlement_is_not_held_past_the_deadline(
    server: FakeLLMServer,
) -> None:
    # the stream's budget settlement waits at most the time left: the stream ends while
    # the settlement still waits (before, it waited the limiter's whole store timeout,
    # 5 s, and left the limiter degraded), and lands once the store answers
    gate = Gate()
    store = StalledQuota(gate, reserves=False, settles=False)
    budget = Budget(limit_usd=10, window="day", name="stall")
    async with make(server, quota_store=store, budgets=[budget]) as executor:
        assert executor.limiter is not None
        # a first run opens the connection, settled at once; then settlements stall
        await asyncio.wait_for(executor.run("warm up", ExecutionContext()), GUARD)
        store.settles = True
        try:

            async def read() -> str:
                # 2 s: the stream's time (a busy machine's), then the settlement's wait
                context = ExecutionContext(deadline=2.0)
                async with executor.stream("hello", context) as stream:
                    return "".join([d async for d in stream if isinstance(d, str)])

            text = await asyncio.wait_for(read(), GUARD)
            waiting, degraded = gate.waiting, executor.limiter.degraded
        finally:
            gate.opened.set()
    assert text == "ok" and waiting == 1 and not degraded
    [usage] = await store.usages()
    assert usage.held == 0 and usage.spent > 0


class LandingWithTheDeadline(MemoryStateStore):
    """
    A state store the breaker treats as remote whose admission, once ``busy`` is set,
    answers in the turn of the event loop in which the run's deadline passes: the loop
    is busy (another task hogging it, a long GC pause) for ``busy`` seconds while the
    admission is under way, and the admission's step comes before the deadline's.
    """

    busy: float | None = None

    @property
    def in_process(self) -> bool:
        return False

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        admission = await super().admit(key, policy)
        busy, self.busy = self.busy, None
        if busy is not None:
            time.sleep(busy)  # noqa: ASYNC251 - the loop is busy: the deadline passes meanwhile
            await asyncio.sleep(0)  # this step is due before the deadline's timer
        return admission


async def test_a_probe_lease_answered_as_the_deadline_passes_comes_back(
    server: FakeLLMServer,
) -> None:
    # the admission lands in the same turn of the loop as the run's deadline: the run
    # gives up at its deadline all the same, and the probe lease the admission took
    # must come back (before, the answer was dropped and the lease kept the key
    # half-open for probe_lease_seconds in every worker)
    store = LandingWithTheDeadline()
    async with (
        CircuitBreaker(store=store, store_timeout=None) as breaker,
        make(server, breaker=breaker) as executor,
    ):
        await executor.run("warm up", ExecutionContext())
        key = "openai:gpt-a"
        await breaker.force_open(key, until=datetime.now(UTC) - timedelta(seconds=1))
        store.busy = 1.0
        with pytest.raises(AllRoutesFailedError, match="deadline"):
            await asyncio.wait_for(executor.run("probe", ExecutionContext(deadline=0.5)), GUARD)
        state = await breaker.get_status(key)
        assert [lease for lease in state.leases if lease[1] > time.time()] == []
        answer = await executor.run("after", ExecutionContext())  # the key admits a probe
    assert answer.content == "ok" and server.requests() == 2  # the probe was never sent
