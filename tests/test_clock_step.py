"""
A wall clock stepped back (an NTP correction) neither blocks rate limits nor holds
circuits open for the size of the step: schedules, open ends and windows keep the time
they had left when last written (`limits.meter.unstepped`, `circuit.unstepped`), on
the memory and SQLite stores, through the executor and the breaker.  Every store runs
the same cases at the store's interface in the contracts (`testing.contracts`:
``step_state_clock``, ``step_quota_clock``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from empathy_models import (
    BreakerPolicy,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    EmpathyLLMExecutor,
    ExecutionContext,
    ModelInfo,
    ModelRegistry,
    OpenAIProvider,
    Outcome,
    RateLimit,
    RetryPolicy,
)
from empathy_models.abc import CircuitStateStore, QuotaStore
from empathy_models.backends import MemoryStateStore, MemoryTelemetryBackend
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.limits import MemoryQuotaStore, SQLiteQuotaStore
from empathy_models.testing import FakeClock, FakeLLMServer

KEY = "sk-test-clockstep"
HOUR = 3600.0
REGISTRY = ModelRegistry(
    models=[
        ModelInfo(
            id="gpt-step",
            provider="openai",
            tier="cheap",
            input_price_per_mtok=1.0,
            output_price_per_mtok=2.0,
            context_window=64_000,
            max_output_tokens=4096,
        )
    ],
    price_version="clockstep-1",
)
CTX = ExecutionContext(workflow="w", stage="s", model="gpt-step", max_tokens=16)


@pytest.fixture
async def server() -> AsyncIterator[FakeLLMServer]:
    async with FakeLLMServer(api_key=KEY) as fake:
        yield fake


def _memory_quota(clock: FakeClock, tmp_path: Path) -> QuotaStore:
    return MemoryQuotaStore(clock=clock)


def _sqlite_quota(clock: FakeClock, tmp_path: Path) -> QuotaStore:
    return SQLiteQuotaStore(str(tmp_path / "quota.db"), clock=clock)


@pytest.mark.parametrize("make_store", [_memory_quota, _sqlite_quota], ids=["memory", "sqlite"])
@pytest.mark.slow
async def test_a_rate_limit_admits_calls_after_the_clock_steps_back_an_hour(
    server: FakeLLMServer,
    tmp_path: Path,
    make_store: Callable[[FakeClock, Path], QuotaStore],
) -> None:
    clock = FakeClock(1_800_000_000.0)
    provider = OpenAIProvider(api_key=KEY, base_url=server.openai_base_url)
    store = make_store(clock, tmp_path)
    async with (
        store,
        EmpathyLLMExecutor(
            [provider],
            registry=REGISTRY,
            telemetry_store=MemoryTelemetryBackend(),
            retry=RetryPolicy.none(),
            rate_limits={"openai": RateLimit(rpm=60)},  # one call a second
            quota_store=store,
            wall_clock=clock,
            rate_limit_wait=1.5,
        ) as executor,
    ):
        for _ in range(3):
            clock.advance(1.0)
            await executor.run("hi", CTX)
        clock.set(clock() - HOUR)  # NTP steps the wall clock back an hour
        for _ in range(3):
            # the schedule was a second ahead at its last write, so the first call
            # waits that second at most (before the fix, an hour: refused)
            clock.advance(1.0)
            response = await executor.run("hi", CTX)  # raises AllRoutesFailedError if refused
            assert response.model == "gpt-step"


async def test_a_push_back_lasts_its_own_time_after_the_clock_steps_back(tmp_path: Path) -> None:
    clock = FakeClock(1_800_000_000.0)
    args = {"cost": 1.0, "interval": 1.0, "burst": 1.0, "max_wait": 0.0}
    async with SQLiteQuotaStore(str(tmp_path / "q.db"), clock=clock) as store:
        await store.push_back("r", seconds=30.0)
        clock.set(clock() - HOUR + 10.0)
        held = await store.acquire("r", **args)
        assert not held.granted and held.wait == pytest.approx(30.0)
        clock.advance(30.0)
        assert (await store.acquire("r", **args)).granted


async def _fail(key: str, breaker: CircuitBreaker) -> None:
    async def boom() -> None:
        raise ConnectionError("down")

    with pytest.raises(ConnectionError):
        await breaker.call(key, boom)


def _memory_state(clock: FakeClock, tmp_path: Path) -> CircuitStateStore:
    return MemoryStateStore(clock=clock)


def _sqlite_state(clock: FakeClock, tmp_path: Path) -> CircuitStateStore:
    return SQLiteStateStore(str(tmp_path / "state.db"), clock=clock)


@pytest.mark.parametrize("make_store", [_memory_state, _sqlite_state], ids=["memory", "sqlite"])
async def test_an_open_circuit_keeps_its_recovery_time_when_the_clock_steps_back(
    tmp_path: Path, make_store: Callable[[FakeClock, Path], CircuitStateStore]
) -> None:
    clock = FakeClock(1_800_000_000.0)
    policy = BreakerPolicy(consecutive_failures=2, recovery_seconds=60.0)
    key = "openai:gpt-step"
    store = make_store(clock, tmp_path)
    async with store, CircuitBreaker(store=store, clock=clock, policy=policy) as br:
        for _ in range(2):
            await _fail(key, br)
        assert (await br.get_status(key)).state is CircuitState.OPEN
        clock.advance(10.0)
        clock.set(clock() - HOUR)  # NTP steps the wall clock back an hour
        status = await br.get_status(key)
        assert status.open_until_ts is not None
        assert status.open_until_ts - clock() == pytest.approx(60.0)
        with pytest.raises(CircuitOpenError) as refused:
            await br.admit(key)
        assert refused.value.retry_after == pytest.approx(60.0)  # not an hour more
        clock.advance(30.0)
        with pytest.raises(CircuitOpenError) as still:
            await br.admit(key)
        assert still.value.retry_after == pytest.approx(30.0)
        assert not await br.is_available(key)
        clock.advance(30.0)
        assert await br.is_available(key)
        probe = await br.admit(key)
        assert probe.lease_id is not None
        assert (await br.get_status(key)).state is CircuitState.HALF_OPEN


@pytest.mark.parametrize("make_store", [_memory_state, _sqlite_state], ids=["memory", "sqlite"])
async def test_a_probe_lease_keeps_its_time_when_the_clock_steps_back(
    tmp_path: Path, make_store: Callable[[FakeClock, Path], CircuitStateStore]
) -> None:
    clock = FakeClock(1_800_000_000.0)
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=60.0, probe_lease_seconds=120.0)
    key = "openai:gpt-step"
    store = make_store(clock, tmp_path)
    async with store, CircuitBreaker(store=store, clock=clock, policy=policy) as br:
        await _fail(key, br)
        clock.advance(60.0)
        await br.admit(key)  # the probe, never reported (its process died)
        clock.set(clock() - HOUR)
        with pytest.raises(CircuitOpenError) as refused:
            await br.admit(key)
        assert refused.value.retry_after == pytest.approx(120.0)
        clock.advance(120.0)
        assert (await br.admit(key)).lease_id is not None  # the lease expired: a new probe


async def _succeed(key: str, breaker: CircuitBreaker) -> None:
    async def fine() -> None:
        return None

    await breaker.call(key, fine)


@pytest.mark.parametrize("make_store", [_memory_state, _sqlite_state], ids=["memory", "sqlite"])
async def test_failures_leave_the_window_in_its_span_after_the_clock_steps_back(
    tmp_path: Path, make_store: Callable[[FakeClock, Path], CircuitStateStore]
) -> None:
    clock = FakeClock(1_800_000_000.0)
    policy = BreakerPolicy(
        consecutive_failures=100,
        minimum_calls=10,
        failure_rate_threshold=0.5,
        window_seconds=60.0,
        window_buckets=6,
    )
    key = "openai:gpt-step"
    store = make_store(clock, tmp_path)
    async with store, CircuitBreaker(store=store, clock=clock, policy=policy) as br:
        for _ in range(4):  # 4 failures in 9 calls: under the minimum of 10
            await _fail(key, br)
            await _succeed(key, br)
        await _succeed(key, br)
        clock.set(clock() - HOUR)  # NTP steps the wall clock back an hour
        await _succeed(key, br)
        await br.flush()  # as the background flusher does: the window keeps its age
        clock.advance(61.0)
        # the 4 failures are a minute old and out of the window: one more failure is
        # 1 in 1 call (before the fix, 5 in 10 for an hour: the circuit opened)
        await _fail(key, br)
        status = await br.get_status(key)
        assert status.state is CircuitState.CLOSED, status
        assert [(calls, failed) for _, calls, failed in status.window] == [(1, 1)]


async def test_a_late_429_after_the_clock_steps_back_holds_the_circuit_its_retry_after(
    tmp_path: Path,
) -> None:
    clock = FakeClock(1_800_000_000.0)
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=60.0)
    key = "openai:gpt-step"
    async with (
        SQLiteStateStore(str(tmp_path / "state.db"), clock=clock) as store,
        CircuitBreaker(store=store, clock=clock, policy=policy) as br,
    ):
        early = await br.admit(key)  # a call made before the circuit opened
        await _fail(key, br)
        clock.set(clock() - HOUR)
        # its 429 asks for 2 minutes, more than the minute the circuit has left: the
        # breaker's view, an hour ahead, must not drop it as holding nothing longer
        await br.report(early, Outcome.RATE_LIMITED, retry_after=120.0, error="429")
        with pytest.raises(CircuitOpenError) as refused:
            await br.admit(key)
        assert refused.value.retry_after == pytest.approx(120.0)
