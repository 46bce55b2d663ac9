"""The contract suites run against the built-in backends, built from their URLs."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from empathy_models import BreakerPolicy, CircuitState, ConfigurationError
from empathy_models.backends import MemoryStateStore
from empathy_models.backends.memory import KEY_TTL
from empathy_models.records import OutcomeReport
from empathy_models.testing.clock import DEFAULT_START, FakeClock
from empathy_models.testing.contracts import (
    AdvanceClock,
    CircuitStateStoreContract,
    ExpireStateKeys,
    StepStateClock,
    TelemetryBackendContract,
    stepping,
)


class TestMemoryTelemetry(TelemetryBackendContract):
    @pytest.fixture
    def telemetry_url(self) -> str:
        return "memory://"


class TestNullTelemetry(TelemetryBackendContract):
    stores_records = False

    @pytest.fixture
    def telemetry_url(self) -> str:
        return "null://"


class TestMemoryStateStore(CircuitStateStoreContract):
    """Time comes from an injected FakeClock: the time-dependent tests take no time."""

    @pytest.fixture
    def state_store_url(self) -> str:
        return "memory://"

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)

    @pytest.fixture
    def expire_state_keys(self, fake_clock: FakeClock) -> ExpireStateKeys:
        async def expire() -> None:
            fake_clock.advance(2 * KEY_TTL)  # past the key_ttl and any open period left

        return expire


class TestNullStateStore(CircuitStateStoreContract):
    keeps_state = False

    @pytest.fixture
    def state_store_url(self) -> str:
        return "null://"


# --------------------------------------------------------------------------- FakeClock


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock()
    assert clock() == DEFAULT_START == clock.now
    assert clock.as_datetime() == datetime(2026, 1, 1, tzinfo=UTC)
    assert clock.advance(1.5) == DEFAULT_START + 1.5
    assert clock() == DEFAULT_START + 1.5
    clock.set(100.0)
    assert clock() == 100.0, "set() may move the clock backward"
    assert repr(clock) == "FakeClock(100.0)"


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf, "1", True])
def test_fake_clock_rejects_bad_steps(bad: object) -> None:
    clock = FakeClock(10.0)
    with pytest.raises(ConfigurationError):
        clock.advance(bad)  # type: ignore[arg-type]
    assert clock() == 10.0
    with pytest.raises(ConfigurationError):
        FakeClock(math.nan)


async def test_fake_clock_sleep_advances_instead_of_waiting(fake_clock: FakeClock) -> None:
    start = fake_clock()
    await fake_clock.sleep(3600)
    assert fake_clock() == start + 3600


async def test_fake_clock_sleep_takes_what_anyio_sleep_takes(fake_clock: FakeClock) -> None:
    start = fake_clock()
    ended: list[str] = []

    async def forever() -> None:
        try:
            await fake_clock.sleep(math.inf)  # anyio.sleep(math.inf): until cancelled
        except anyio.get_cancelled_exc_class():
            ended.append("cancelled")
            raise

    async with anyio.create_task_group() as group:
        group.start_soon(forever)
        await anyio.wait_all_tasks_blocked()
        group.cancel_scope.cancel()
    assert ended == ["cancelled"] and fake_clock() == start
    for bad in (-1.0, math.nan, -math.inf):  # anyio.sleep refuses these with ValueError
        with pytest.raises(ValueError, match=r"FakeClock\.sleep: seconds must be a number >= 0"):
            await fake_clock.sleep(bad)
    assert fake_clock() == start
    await fake_clock.sleep(0)
    assert fake_clock() == start


def test_fake_clock_never_advances_to_infinity() -> None:
    clock = FakeClock(1e308)
    with pytest.raises(ConfigurationError, match="past the largest time"):
        clock.advance(1e308)
    assert clock() == 1e308


async def test_fake_clock_drives_the_memory_store_exactly(fake_clock: FakeClock) -> None:
    policy = BreakerPolicy(consecutive_failures=1, recovery_seconds=30.0)
    async with MemoryStateStore(clock=fake_clock) as store:
        admission = await store.admit("k", policy)
        assert admission.ticket is not None
        opened = await store.record(
            "k", policy, [OutcomeReport(ticket=admission.ticket, outcome="failure")]
        )
        assert opened.opened_at_ts == fake_clock()
        assert (await store.admit("k", policy)).retry_after == 30.0
        fake_clock.advance(29.5)
        still_open = await store.admit("k", policy)
        assert not still_open.admitted and still_open.retry_after == 0.5
        fake_clock.advance(0.5)
        probe = await store.admit("k", policy)
        assert probe.admitted and probe.state.state is CircuitState.HALF_OPEN
        assert probe.ticket is not None
        assert probe.ticket.lease_expires_ts == fake_clock() + policy.probe_lease_seconds
