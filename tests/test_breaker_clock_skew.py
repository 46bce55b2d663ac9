"""
A breaker whose clock is off its store's judges open ends and probe leases by the
store's clock (`CircuitStateStore.now`), measured on a round trip: its local view
neither rejects for the skew longer nor lets calls through early.  The stores here run
on a `FakeClock`; the breaker's clock is that clock an hour off.  (Every store runs
the same check through `CircuitStateStoreContract` with the breaker's clock skewed.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from empathy_models import BreakerPolicy, CircuitBreaker, CircuitOpenError, CircuitState
from empathy_models.abc import CircuitStateStore
from empathy_models.backends import MemoryStateStore
from empathy_models.backends.sqlite import SQLiteStateStore
from empathy_models.exceptions import RecordValidationError
from empathy_models.records import Outcome
from empathy_models.testing import FakeClock

POLICY = BreakerPolicy(
    consecutive_failures=1,
    recovery_seconds=60.0,
    max_recovery_seconds=60.0,
    probe_lease_seconds=30.0,
)


@pytest.fixture(params=["memory", "sqlite"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, fake_clock: FakeClock
) -> AsyncIterator[CircuitStateStore]:
    if request.param == "memory":
        made: CircuitStateStore = MemoryStateStore(clock=fake_clock)
    else:
        made = SQLiteStateStore(tmp_path / "state.db", clock=fake_clock)
    async with made:
        yield made


async def _trip(breaker: CircuitBreaker, key: str) -> None:
    ticket = await breaker.admit(key)
    await breaker.report(ticket, Outcome.FAILURE, error="HTTP 503")


@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
async def test_a_worker_whose_clock_is_off_probes_when_the_stores_open_time_ends(
    store: CircuitStateStore, fake_clock: FakeClock, skew: float
) -> None:
    breaker = CircuitBreaker(store, POLICY, clock=lambda: fake_clock() + skew, local_view_ttl=600.0)
    async with breaker:
        await _trip(breaker, "k")
        fake_clock.advance(59.0)
        with pytest.raises(CircuitOpenError) as raised:
            await breaker.admit("k")
        assert raised.value.retry_after == pytest.approx(1.0, abs=0.01)
        assert not breaker.available_hint("k")
        fake_clock.advance(1.5)  # the store's open time is over
        assert breaker.available_hint("k")
        probe = await breaker.admit("k")  # a half-open probe, not an hour more of "open"
        assert probe.lease_id is not None
        status = await breaker.get_status("k")
        assert status.state is CircuitState.HALF_OPEN and status.probes_in_flight == 1
        # the probe's lease expires on the store's clock too
        assert not breaker.available_hint("k")
        fake_clock.advance(31.0)
        assert breaker.available_hint("k")
        assert await breaker.is_available("k")


@pytest.mark.parametrize("skew", [-3600.0, 3600.0])
async def test_a_worker_whose_clock_is_off_forces_a_key_open_for_seconds_of_the_stores(
    store: CircuitStateStore, fake_clock: FakeClock, skew: float
) -> None:
    async with CircuitBreaker(store, POLICY, clock=lambda: fake_clock() + skew) as breaker:
        forced = await breaker.force_open("k", for_seconds=600.0, reason="maintenance")
        assert forced.open_until_ts == pytest.approx(fake_clock() + 600.0)
        fake_clock.advance(599.0)
        with pytest.raises(CircuitOpenError) as raised:
            await breaker.admit("k")
        assert raised.value.retry_after == pytest.approx(1.0, abs=0.01)
        with pytest.raises(RecordValidationError, match="not both"):
            await breaker.force_open("k", until=datetime.now(UTC), for_seconds=1.0)
        with pytest.raises(RecordValidationError, match="for_seconds"):
            await breaker.force_open("k", for_seconds=-1.0)
        assert not breaker.degraded
