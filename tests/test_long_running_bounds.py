"""
A service runs one breaker (and one executor around it) for weeks over keys that come
and go: a breaker keyed per tenant, models that leave the registry.  What it holds per
key follows the keys in use, not every key it ever saw, and what it still holds of a
key answers as before.
"""

from __future__ import annotations

from typing import Any

import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState
from empathy_models.backends import MemoryStateStore
from empathy_models.exceptions import ConfigurationError, ServerError
from empathy_models.testing.clock import FakeClock

DAY = 86400.0
TENANTS = 5000  # new keys a week
POLICY = BreakerPolicy(
    consecutive_failures=3, minimum_calls=10_000, window_seconds=3600.0, recovery_seconds=600.0
)


async def ok() -> int:
    return 1


async def fail() -> None:
    raise ServerError("upstream 503", status=503)


async def test_an_in_process_breaker_keyed_per_tenant_forgets_tenants_gone_for_a_week() -> None:
    clock = FakeClock()
    held = []
    async with CircuitBreaker(policy=POLICY, clock=clock) as breaker:
        for week in range(4):
            for i in range(TENANTS):
                assert await breaker.call(f"tenant-{week}-{i}", ok) == 1
            held.append(len(await breaker.snapshot()))
            clock.advance(8 * DAY)  # those tenants are gone
    # the old store kept a state per key ever used: 5,000 more every week
    assert max(held) <= 2 * TENANTS, held


async def test_what_a_forgotten_key_held_is_what_a_new_key_holds() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    async with CircuitBreaker(store, POLICY, clock=clock) as breaker:
        for _ in range(2):
            with pytest.raises(ServerError):
                await breaker.call("flaky", fail)
        for _ in range(3):
            with pytest.raises(ServerError):
                await breaker.call("tripped", fail)
        await breaker.force_open("maintenance", reason="until told")
        await breaker.disable("never-trip")
        clock.advance(8 * DAY)
        for i in range(2 * TENANTS):
            await breaker.call(f"tenant-{i}", ok)
        keys = {state.key for state in await breaker.snapshot()}
        # idle for a week: gone (as a Redis key past its key_ttl); held until a reset: kept
        assert {"flaky", "tripped"}.isdisjoint(keys)
        assert {"maintenance", "never-trip"} <= keys
        with pytest.raises(CircuitOpenError):
            await breaker.call("maintenance", ok)
        # a forgotten key starts over: its two old failures no longer count
        with pytest.raises(ServerError):
            await breaker.call("flaky", fail)
        assert (await breaker.get_status("flaky")).consecutive_failures == 1
        for _ in range(2):
            with pytest.raises(ServerError):
                await breaker.call("flaky", fail)
        with pytest.raises(CircuitOpenError):
            await breaker.call("flaky", ok)
        assert (await breaker.get_status("flaky")).state is CircuitState.OPEN


async def test_a_key_used_within_the_week_is_kept_with_its_counts() -> None:
    clock = FakeClock()
    async with CircuitBreaker(policy=POLICY, clock=clock) as breaker:
        for _ in range(2):
            with pytest.raises(ServerError):
                await breaker.call("flaky", fail)
        clock.advance(6 * DAY)
        for i in range(2 * TENANTS):
            await breaker.call(f"tenant-{i}", ok)
        assert (await breaker.get_status("flaky")).consecutive_failures == 2


async def test_a_key_ttl_shorter_than_a_window_bucket_forgets_successes_too() -> None:
    # buckets of 10 s, keys forgotten after 5 s idle: a success after 6 s idle, in the
    # bucket of the last ones, starts a new key instead of adding to them
    policy = BreakerPolicy(consecutive_failures=100, minimum_calls=4, window_seconds=60.0)
    clock = FakeClock()
    store = MemoryStateStore(clock=clock, key_ttl=5)
    async with CircuitBreaker(store, policy, clock=clock) as breaker:
        for _ in range(2):
            await breaker.call("k", ok)
        clock.advance(6)
        await breaker.call("k", ok)
        for _ in range(2):
            with pytest.raises(ServerError):
                await breaker.call("k", fail)
        state = await breaker.get_status("k")
    # one success and two failures since the key was forgotten: 3 calls, under the
    # minimum of 4 (counting the forgotten two, 2 failures in 5 calls)
    assert [(calls, failures) for _, calls, failures in state.window] == [(3, 2)], state


async def test_key_ttl_none_keeps_every_key_and_a_bad_one_is_refused() -> None:
    clock = FakeClock()
    store = MemoryStateStore(clock=clock, key_ttl=None)
    async with CircuitBreaker(store, POLICY, clock=clock) as breaker:
        for week in range(2):
            for i in range(TENANTS):
                await breaker.call(f"tenant-{week}-{i}", ok)
            clock.advance(8 * DAY)
        assert len(await breaker.snapshot()) == 2 * TENANTS
    for bad in (0, -1.0, float("nan"), "7d", True):
        with pytest.raises(ConfigurationError, match="key_ttl"):
            MemoryStateStore(key_ttl=bad)  # type: ignore[arg-type]


@pytest.mark.slow
async def test_the_breaker_state_gauge_lets_go_of_keys_that_closed_long_ago() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import View
    from opentelemetry.sdk.trace import TracerProvider

    from empathy_models import EmpathyLLMExecutor, ExecutionContext
    from empathy_models._otel_breaker import MAX_KEY_STATES
    from empathy_models.backends import NullTelemetryBackend
    from empathy_models.testing import FakeProvider

    reader = InMemoryMetricReader()
    # every series the gauge reports is exported (the SDK's default limit, 2,000 per
    # metric, would fold the others into one overflow series)
    whole = View(
        instrument_name="empathy_models.breaker.state", aggregation_cardinality_limit=10**6
    )
    meters = MeterProvider(metric_readers=[reader], views=[whole])

    def gauge() -> dict[str, int]:
        data = reader.get_metrics_data()
        assert data is not None
        points: list[Any] = [
            p
            for r in data.resource_metrics
            for s in r.scope_metrics
            for m in s.metrics
            if m.name == "empathy_models.breaker.state"
            for p in m.data.data_points
        ]
        return {str(p.attributes["empathy_models.breaker.key"]): int(p.value) for p in points}

    breaker = CircuitBreaker(policy=POLICY)
    executor = EmpathyLLMExecutor(
        [FakeProvider(name="openai")],
        breaker=breaker,
        telemetry_store=NullTelemetryBackend(),
        otel=True,
        meter_provider=meters,
        tracer_provider=TracerProvider(),
    )
    context = ExecutionContext(workflow="svc", model="gpt-4.1-mini")
    sizes = []
    async with breaker, executor:
        await executor.run("hi", context)
        await breaker.force_open("tenant-held", reason="maintenance")
        for week in range(3):
            # the service's breaker, keyed per tenant, also guards the executor's model:
            # each tenant of the week is shut off once by an operator, then let back in
            for i in range(TENANTS):
                key = f"tenant-{week}-{i}"
                await breaker.force_open(key, reason="abuse")
                await breaker.reset(key)
            sizes.append(len(gauge()))
        await executor.run("hi", context)
        shown = gauge()
    meters.shutdown()
    # the old gauge reported every key that ever changed state, closed for weeks
    assert max(sizes) <= 2 * MAX_KEY_STATES + 2, sizes
    assert shown["tenant-held"] == 3  # forced open: kept
    assert shown["openai:gpt-4.1-mini"] == 0  # in use: reported again once called
