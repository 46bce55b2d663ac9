"""
What a call holds when it is cancelled or the executor closes under it, over real HTTP
to a `FakeLLMServer` with SQLite quota, state and telemetry files: whatever ends the
call (``Task.cancel``, ``asyncio.timeout``, an anyio scope, `EmpathyLLMExecutor.aclose`),
its budget reservation is released, a breaker probe lease comes back, its provider
slot is freed and its record written.

Each cancel is placed by a signal from the code under test (a telemetry write, a
breaker listener or report, a stream's close) or by counting event-loop turns, never
by a timer; ``anyio.fail_after`` appears only as a guard against a hang.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from empathy_models import (
    BreakerPolicy,
    Budget,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    LLMCallRecord,
    ModelRegistry,
    Outcome,
    RetryPolicy,
)
from empathy_models.abc import Completion, CompletionRequest, CompletionStream
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteTelemetryBackend
from empathy_models.breaker import BreakerEvent, CircuitBreaker
from empathy_models.exceptions import NotOpenError, ProviderTimeoutError
from empathy_models.limits import SQLiteQuotaStore
from empathy_models.providers import OpenAIProvider
from empathy_models.records import Ticket
from empathy_models.testing import FakeLLMServer, ModelBehavior, StreamBehavior

from ._fakes import KEY, WrappedStream, WrappingOpenAI, fake_model, http_executor

REGISTRY = ModelRegistry(
    models=[fake_model("m", "openai", "cheap", 1.0, max_output_tokens=4096)],
    price_version="cancel-test-1",
)
CTX = ExecutionContext(workflow="w", stage="s", model="m", max_tokens=100)
HOWS = ["Task.cancel", "asyncio.timeout", "anyio"]


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


def make(server: FakeLLMServer, **options: Any) -> EmpathyLLMExecutor:
    return http_executor(server, REGISTRY, **options)


class Cancelled:
    """
    Runs an operation in a task of its own, to be cancelled ``how`` when the test says
    (`cancel`); `ended` says whether the cancellation ended it.
    """

    def __init__(self, how: str, op: Callable[[], Awaitable[object]]) -> None:
        self.how = how
        self._timeout: asyncio.Timeout | None = None
        self._scope: anyio.CancelScope | None = None
        self.task = asyncio.ensure_future(self._run(op))

    async def _run(self, op: Callable[[], Awaitable[object]]) -> str:
        if self.how == "asyncio.timeout":
            try:
                async with asyncio.timeout(None) as self._timeout:
                    await op()
            except TimeoutError:
                return "cancelled"
        elif self.how == "anyio":
            with anyio.CancelScope() as self._scope:
                await op()
            if self._scope.cancelled_caught:
                return "cancelled"
        else:
            await op()
        return "finished"

    def cancel(self) -> None:
        if self.how == "asyncio.timeout":
            assert self._timeout is not None
            self._timeout.reschedule(asyncio.get_running_loop().time())
        elif self.how == "anyio":
            assert self._scope is not None
            self._scope.cancel()
        else:
            self.task.cancel()

    async def ended(self) -> bool:
        """True when the cancellation ended the operation (else it finished)."""
        with anyio.fail_after(30):  # a guard against a hang, not a wait
            try:
                return await self.task == "cancelled"
            except asyncio.CancelledError:
                return True


async def _signalled(event: asyncio.Event) -> None:
    with anyio.fail_after(30):  # a guard, not a wait: the signal comes from the call
        await event.wait()


# --------------------------------------------------------------------------- budgets


class LockingTelemetry(MemoryTelemetryBackend):
    """
    Memory telemetry that, once ``armed``, has another worker take the quota file's
    write lock as a success is recorded, i.e. right before the call's budget is settled.
    """

    def __init__(self, quota: Path) -> None:
        super().__init__()
        self.quota = quota
        self.armed = False
        self.locked = asyncio.Event()
        self.other: sqlite3.Connection | None = None

    async def record(self, record: LLMCallRecord) -> None:
        await super().record(record)
        if self.armed and record.success:
            self.armed = False
            self.other = sqlite3.connect(self.quota, timeout=0, isolation_level=None)
            self.other.execute("BEGIN IMMEDIATE")
            self.locked.set()

    def unlock(self) -> None:
        assert self.other is not None
        self.other.execute("ROLLBACK")
        self.other.close()


@pytest.mark.parametrize("how", HOWS)
async def test_a_cancel_while_the_call_is_settled_still_releases_its_reservation(
    server: FakeLLMServer, tmp_path: Path, how: str
) -> None:
    # asyncio's own cancellation goes through anyio's shields: the settlement is carried
    # to its end in a task of its own, and the cancellation raised after it
    quota = tmp_path / "quota.db"
    telemetry = LockingTelemetry(quota)
    async with make(
        server,
        telemetry_store=telemetry,
        budgets=[Budget(limit_usd=10.0)],
        quota_store=f"sqlite:///{quota}",
    ) as executor:
        await executor.run("warm up", CTX)  # the quota table exists
        telemetry.armed = True
        call = Cancelled(how, lambda: executor.run("hello", CTX))
        await _signalled(telemetry.locked)  # the call answered; its settlement waits
        call.cancel()
        telemetry.unlock()  # the other worker's transaction ends
        # (anyio's cancel may come too late to end the call: it is delivered only at a
        # checkpoint, and none may follow the settlement)
        assert await call.ended() or how == "anyio"
        assert executor.limiter is not None
        [usage] = await executor.limiter.store.usages()
    assert usage.calls == 2 and usage.held == 0
    assert usage.reserved == usage.settled + usage.released
    assert server.requests("m") == 2


async def test_a_cancel_at_any_point_of_a_reservation_leaves_nothing_held(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the cancel lands after a growing number of loop turns: before, inside (its COMMIT
    # sent, the answer not yet back) and after the reservation's transaction
    async with make(
        server, budgets=[Budget(limit_usd=10.0)], quota_store=f"sqlite:///{tmp_path}/quota.db"
    ) as executor:
        assert executor.limiter is not None
        store = executor.limiter.store
        await executor.run("warm up", CTX)  # the file is open, its table made
        server.set_behavior("m", ModelBehavior.always("hang"))
        # trials whose cancel came in or after a reservation, before its request
        reserved_unsent = 0
        trials = 0
        while trials < 60 or (reserved_unsent == 0 and trials < 600):
            [before] = await store.usages()
            sent = server.requests("m")
            task = asyncio.ensure_future(executor.run("hello", CTX))
            for _ in range(trials % 60):
                await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            trials += 1
            [after] = await store.usages()
            assert after.held == 0, f"held after trial {trials}: {after}"
            reserved_unsent += after.reserved > before.reserved and server.requests("m") == sent
    assert reserved_unsent, "no cancel landed in a reservation: nothing was tested"


# --------------------------------------------------------------------------- breaker leases


def probing_breaker(tmp_path: Path, listener: Callable[[BreakerEvent], None]) -> CircuitBreaker:
    """
    A breaker on an SQLite file that it reads at every admission (no local view), calling
    ``listener`` on each event; a tripped key half-opens after 50 ms, and its probe
    leases last two minutes: a lease not given back is still held when the test looks.
    """
    return CircuitBreaker(
        store=f"sqlite:///{tmp_path}/state.db",
        policy=BreakerPolicy(recovery_seconds=0.05, probe_lease_seconds=120),
        listeners=[listener],
        local_view_ttl=0,
    )


async def test_a_cancel_during_the_model_keys_admission_gives_back_the_provider_keys_lease(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the executor admits a call through the provider's key, then the model's: a cancel
    # at the second admission must not keep the probe lease taken at the first
    armed = False

    def cancel_at_half_open(event: BreakerEvent) -> None:
        nonlocal armed
        if armed and event.key == "openai" and event.new_state is CircuitState.HALF_OPEN:
            armed = False
            task = asyncio.current_task()  # listeners run in the caller's task
            assert task is not None
            task.cancel()  # delivered at the next suspension: the model key's admission

    async with (
        probing_breaker(tmp_path, cancel_at_half_open) as breaker,
        make(server, breaker=breaker) as executor,
    ):
        await executor.run("warm up", CTX)
        await breaker.force_open("openai", until=datetime.now(UTC) - timedelta(seconds=1))
        armed = True
        with pytest.raises(asyncio.CancelledError):
            await asyncio.ensure_future(executor.run("probe", CTX))
        assert not armed  # the cancel came at the provider key's half-open admission
        state = await breaker.get_status("openai")
        assert [lease for lease in state.leases if lease[1] > time.time()] == []
        answer = await executor.run("after", CTX)  # the provider key admits a probe again
    assert answer.model == "m"


@pytest.mark.parametrize("half_open", ["openai:m", "openai"])
@pytest.mark.parametrize("kind", ["run", "stream"])
async def test_a_run_with_a_deadline_cancelled_at_its_admission_gives_back_the_lease(
    server: FakeLLMServer, tmp_path: Path, half_open: str, kind: str
) -> None:
    # with a deadline each admission (the provider key's, then the model key's) runs
    # in a task of its own, which the cancelled run waits for: the probe lease it was
    # granted must come back, not block the key for probe_lease_seconds in every worker
    ctx = ExecutionContext(workflow="w", stage="s", model="m", max_tokens=100, deadline=30.0)
    calls: list[asyncio.Task[object]] = []

    def cancel_at_half_open(event: BreakerEvent) -> None:
        if calls and event.key == half_open and event.new_state is CircuitState.HALF_OPEN:
            calls.pop().cancel()  # the run waiting for this admission (in its own task)

    async def call() -> object:
        if kind == "run":
            return await executor.run("probe", ctx)
        async with executor.stream("probe", ctx) as stream:
            return await stream.get_final_response()

    async with (
        probing_breaker(tmp_path, cancel_at_half_open) as breaker,
        make(server, breaker=breaker) as executor,
    ):
        await executor.run("warm up", ctx)
        await breaker.force_open(half_open, until=datetime.now(UTC) - timedelta(seconds=1))
        task = asyncio.ensure_future(call())
        calls.append(task)
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not calls  # the cancel came at the half-open admission
        state = await breaker.get_status(half_open)
        assert [lease for lease in state.leases if lease[1] > time.time()] == []
        answer = await executor.run("after", ctx)  # the key admits a probe again
    assert answer.model == "m"


# --------------------------------------------------------------------------- records


class SlowSuccessReports:
    """
    A breaker (the executor takes anything with ``key_for``, ``admit``, ``report`` and
    ``available_hint``) whose store takes its time to hear a success, as a shared store
    does when the successes written behind are flushed inline.
    """

    def __init__(self) -> None:
        self.breaker = CircuitBreaker()
        self.armed = False
        self.reporting = asyncio.Event()
        self.release = asyncio.Event()

    def key_for(self, provider: str, model: str | None = None) -> str:
        return self.breaker.key_for(provider, model)

    async def admit(self, key: str) -> Ticket:
        return await self.breaker.admit(key)

    def available_hint(self, key: str) -> bool:
        return self.breaker.available_hint(key)

    async def report(self, ticket: Ticket, outcome: Outcome, **details: Any) -> None:
        if self.armed and outcome is Outcome.SUCCESS:
            self.armed = False
            self.reporting.set()
            await self.release.wait()
        await self.breaker.report(ticket, outcome, **details)


async def _read_all(executor: EmpathyLLMExecutor, prompt: str) -> None:
    async with executor.stream(prompt, CTX) as stream:
        await stream.get_final_response()


@pytest.mark.parametrize("how", HOWS)
@pytest.mark.parametrize("kind", ["run", "stream"])
async def test_a_success_is_recorded_when_the_caller_is_cancelled_as_the_breaker_hears_it(
    server: FakeLLMServer, tmp_path: Path, how: str, kind: str
) -> None:
    breaker = SlowSuccessReports()
    calls = tmp_path / "calls.db"
    async with make(server, breaker=breaker, telemetry_store=f"sqlite:///{calls}") as executor:
        breaker.armed = True
        if kind == "run":
            call = Cancelled(how, lambda: executor.run("hello", CTX))
        else:
            call = Cancelled(how, lambda: _read_all(executor, "hello"))
        await _signalled(breaker.reporting)
        call.cancel()
        breaker.release.set()
        assert await call.ended()
    async with SQLiteTelemetryBackend(calls) as telemetry:
        records = await telemetry.recent()
    assert [(r.model, r.outcome) for r in records] == [("m", Outcome.SUCCESS)]


# --------------------------------------------------------------------------- aclose


async def _quota_held(quota: Path) -> int:
    async with SQLiteQuotaStore(quota) as store:
        return sum(usage.held for usage in await store.usages())


async def _outcomes(calls: Path) -> list[Outcome]:
    async with SQLiteTelemetryBackend(calls) as telemetry:
        return [record.outcome for record in await telemetry.recent()]


def _closing_executor(server: FakeLLMServer, tmp_path: Path) -> EmpathyLLMExecutor:
    return make(
        server,
        telemetry_store=f"sqlite:///{tmp_path}/calls.db",
        breaker=f"sqlite:///{tmp_path}/state.db",
        budgets=[Budget(limit_usd=10.0)],
        quota_store=f"sqlite:///{tmp_path}/quota.db",
    )


async def test_aclose_ends_a_run_in_flight_with_its_bookkeeping_done_first(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    server.script("m", ["hang"])
    executor = _closing_executor(server, tmp_path)
    await executor.__aenter__()
    task = asyncio.ensure_future(executor.run("hello", CTX))
    await server.wait_for_requests(1, "m")
    await executor.aclose()
    with anyio.fail_after(30), pytest.raises(NotOpenError, match=r"closed .* in flight"):
        await task  # at once: aclose waited for it
    assert await _quota_held(tmp_path / "quota.db") == 0
    assert await _outcomes(tmp_path / "calls.db") == [Outcome.CANCELLED]


async def test_an_aclose_while_another_is_closing_returns_once_the_executor_is_closed(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    """
    A second `aclose` (an ``async with`` ending while a shutdown task closes the
    executor) returns once the first has closed it: the run it ended recorded, the
    stores closed.  It returned at once, before anything was closed or written.
    """
    server.script("m", ["hang"])
    executor = _closing_executor(server, tmp_path)
    await executor.__aenter__()
    task = asyncio.ensure_future(executor.run("hello", CTX))
    await server.wait_for_requests(1, "m")
    first = asyncio.ensure_future(executor.aclose())
    await asyncio.sleep(0)  # the first close has begun: it waits for the run to end
    assert not first.done()
    with anyio.fail_after(30):
        await executor.aclose()
    assert first.done() and first.exception() is None
    assert executor.telemetry_store is not None and executor.telemetry_store.closed
    assert await _outcomes(tmp_path / "calls.db") == [Outcome.CANCELLED]
    with pytest.raises(NotOpenError):
        await task


async def _closing_begun(executor: EmpathyLLMExecutor, task: asyncio.Future[Any]) -> None:
    """Until `aclose` has sent its cancellations and waits for the runs (or ``task`` ended)."""
    for _ in range(100_000):
        if task.done() or executor._inflight.idle is not None:
            return
        await anyio.lowlevel.checkpoint()
    raise AssertionError("aclose never began waiting for the runs")


@pytest.mark.parametrize("kind", ["run", "empty stream"])
async def test_a_run_answered_when_aclose_comes_keeps_its_answer(
    server: FakeLLMServer, tmp_path: Path, kind: str
) -> None:
    """
    `aclose` ends the runs in flight with `NotOpenError`, their attempt recorded as
    cancelled.  A run whose answer came before (recorded a success, charged, the
    breaker hearing it) is not in flight any more: it returns its answer once its
    bookkeeping is done, which `aclose` waits for; it does not raise while its record
    says it succeeded.
    """
    if kind == "empty stream":
        server.set_behavior("m", ModelBehavior(content="", output_tokens=0))
    breaker = SlowSuccessReports()
    breaker.armed = True
    calls = tmp_path / "calls.db"
    executor = make(
        server,
        breaker=breaker,
        telemetry_store=f"sqlite:///{calls}",
        budgets=[Budget(limit_usd=10.0)],
        quota_store=f"sqlite:///{tmp_path}/quota.db",
    )
    await executor.__aenter__()

    async def call() -> str | None:
        if kind == "run":
            return (await executor.run("hello", CTX)).model
        async with executor.stream("hello", CTX) as stream:
            return (await stream.get_final_response()).model

    task = asyncio.ensure_future(call())
    await _signalled(breaker.reporting)  # the answer is in, the breaker hears it
    closing = asyncio.ensure_future(executor.aclose())
    await _closing_begun(executor, task)
    breaker.release.set()
    with anyio.fail_after(30):  # a guard, not a wait
        await closing
        assert await task == "m"
    assert await _quota_held(tmp_path / "quota.db") == 0
    assert await _outcomes(calls) == [Outcome.SUCCESS]


async def test_aclose_ends_a_stream_being_read_with_its_bookkeeping_done_first(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    # the server stalls after two chunks: the reader waits for the third when aclose comes
    stall = StreamBehavior(fault_after=2, fault="hang")
    server.set_behavior("m", ModelBehavior(content="a b c d e f", stream=stall))
    executor = _closing_executor(server, tmp_path)
    await executor.__aenter__()
    got: list[str] = []
    reading = asyncio.Event()

    async def read() -> None:
        async with executor.stream("hello", CTX) as stream:
            async for delta in stream:
                got.append(delta)
                if len(got) == 2:
                    reading.set()

    task = asyncio.ensure_future(read())
    await _signalled(reading)
    await executor.aclose()
    with anyio.fail_after(30), pytest.raises(NotOpenError, match="stream"):
        await task  # at once: aclose waited for it
    assert got == ["a", " b"]
    assert await _quota_held(tmp_path / "quota.db") == 0
    assert await _outcomes(tmp_path / "calls.db") == [Outcome.CANCELLED]


async def test_aclose_closes_a_stream_nobody_is_reading_and_its_next_read_says_so(
    server: FakeLLMServer, tmp_path: Path
) -> None:
    server.set_behavior("m", ModelBehavior(content="a b c d e f"))
    executor = _closing_executor(server, tmp_path)
    await executor.__aenter__()
    async with executor.stream("hello", CTX) as stream:
        assert await stream.__anext__() == "a"
        await executor.aclose()  # from the task that holds the stream, between reads
        with pytest.raises(NotOpenError, match="stream"):
            await stream.__anext__()
        with pytest.raises(NotOpenError):
            await stream.get_final_response()
    assert await _quota_held(tmp_path / "quota.db") == 0
    assert await _outcomes(tmp_path / "calls.db") == [Outcome.CANCELLED]
    with pytest.raises(NotOpenError):
        async with executor.stream("again", CTX):
            pass


# --------------------------------------------------------------------------- a stream's close


class SlowToClose(WrappedStream):
    """An HTTP stream behind a provider's own, whose ``aclose`` waits for ``gate``."""

    def __init__(self, inner: CompletionStream, closing: asyncio.Event) -> None:
        super().__init__(inner)
        self.closing = closing

    async def aclose(self) -> None:
        self.closing.set()
        try:
            await asyncio.Event().wait()  # until cancelled
        finally:
            await self.inner.aclose()


@pytest.mark.parametrize("end", ["interrupted", "left"])
async def test_a_cancel_while_a_stream_is_closed_still_reports_its_attempt(
    server: FakeLLMServer, tmp_path: Path, end: str
) -> None:
    # "interrupted": the stream fails after two chunks; "left": the caller breaks out
    server.set_behavior(
        "m", ModelBehavior(content="a b c d e f", stream=StreamBehavior(fault_after=2))
    )
    closing = asyncio.Event()
    provider = WrappingOpenAI(
        lambda inner: SlowToClose(inner, closing), api_key=KEY, base_url=server.openai_base_url
    )
    calls = tmp_path / "calls.db"
    async with EmpathyLLMExecutor(
        [provider],
        registry=REGISTRY,
        retry=RetryPolicy.none(),
        telemetry_store=f"sqlite:///{calls}",
        budgets=[Budget(limit_usd=10.0)],
        quota_store=f"sqlite:///{tmp_path}/quota.db",
        concurrency_per_provider=1,
    ) as executor:

        async def read() -> None:
            async with executor.stream("hello", CTX) as stream:
                async for _ in stream:
                    if end == "left":
                        break

        task = asyncio.ensure_future(read())
        await _signalled(closing)  # the stream's aclose is under way
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the provider slot (one) came back: another call gets it
        server.set_behavior("m", ModelBehavior())
        with anyio.fail_after(30):  # a guard, not a wait
            await executor.run("again", CTX)
        assert executor.limiter is not None
        [usage] = await executor.limiter.store.usages()
    assert usage.held == 0
    first = Outcome.FAILURE if end == "interrupted" else Outcome.CANCELLED
    assert sorted(await _outcomes(calls)) == sorted([first, Outcome.SUCCESS])


class CancelTurnedTimeout(OpenAIProvider):
    """
    An `OpenAIProvider` whose client turns a cancel into a timeout of its own, as
    aiohttp does when the cancel lands as its per-request timer fires (the provider
    says so with a `ProviderTimeoutError`, which is retried).
    """

    async def complete(
        self,
        request: CompletionRequest,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the provider API's own parameter
    ) -> Completion:
        try:
            return await super().complete(request, timeout=timeout)
        except asyncio.CancelledError:
            raise ProviderTimeoutError(
                "the client's timer fired", provider="openai", model=request.model
            ) from None


@pytest.mark.parametrize("how", HOWS)
async def test_a_cancel_the_client_turns_into_a_timeout_ends_the_run_and_is_not_retried(
    server: FakeLLMServer, tmp_path: Path, how: str
) -> None:
    server.script("m", ["hang"] * 5)
    calls = tmp_path / "calls.db"
    async with EmpathyLLMExecutor(
        [CancelTurnedTimeout(api_key=KEY, base_url=server.openai_base_url)],
        registry=REGISTRY,
        retry=RetryPolicy(max_attempts=5, base_delay=0.0, max_delay=0.0, jitter=False),
        telemetry_store=f"sqlite:///{calls}",
        budgets=[Budget(limit_usd=10.0)],
        quota_store=f"sqlite:///{tmp_path}/quota.db",
    ) as executor:
        call = Cancelled(how, lambda: executor.run("hello", CTX))
        await server.wait_for_requests(1, "m")
        call.cancel()
        assert await call.ended()
        assert server.requests("m") == 1  # not sent again
        assert executor.limiter is not None
        [usage] = await executor.limiter.store.usages()
    assert usage.held == 0
    assert await _outcomes(calls) == [Outcome.CANCELLED]
