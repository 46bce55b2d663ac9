"""
`FailoverStateStore` (the breaker's degraded mode as a store decorator) runs the
state-store contract: over a healthy primary (memory, a shared SQLite file) it must be
that primary, and over a primary that is down its per-process fallback must be a
correct store on its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import pytest
import pytest_asyncio

from empathy_models import BreakerPolicy, CircuitState
from empathy_models.abc import CircuitStateStore
from empathy_models.backends import MemoryStateStore, state_store_from_url
from empathy_models.backends._failover import FailoverStateStore
from empathy_models.exceptions import StateStoreError
from empathy_models.records import Admission, CircuitBreakerState, OutcomeReport
from empathy_models.testing.clock import FakeClock
from empathy_models.testing.contracts import (
    AdvanceClock,
    CircuitStateStoreContract,
    StepStateClock,
    stepping,
)


class _Decorated(CircuitStateStoreContract):
    """The store under test is the URL's store inside a `FailoverStateStore`."""

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)

    @pytest_asyncio.fixture(loop_scope="function")
    async def state_store(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[CircuitStateStore]:
        primary = state_store_from_url(state_store_url, **state_store_options)
        async with FailoverStateStore(primary, clock=state_store_options["clock"]) as store:
            yield store


class TestFailoverOverMemory(_Decorated):
    @pytest.fixture
    def state_store_url(self) -> str:
        return "memory://"


class TestFailoverOverSQLiteFile(_Decorated):
    @pytest.fixture
    def state_store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/state.db"


class DownStore(CircuitStateStore):
    """
    A store whose every operation fails as an unreachable server's would, until ``up``
    is set: then it answers from that store.
    """

    def __init__(self) -> None:
        self.attempts = 0
        self.up: CircuitStateStore | None = None

    def _down(self) -> NoReturn:
        self.attempts += 1
        raise ConnectionRefusedError(111, "Connection refused")

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        if self.up is not None:
            return await self.up.admit(key, policy)
        self._down()

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        if self.up is not None:
            return await self.up.record(key, policy, reports)
        self._down()

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        if self.up is not None:
            return await self.up.force(
                key, state, until=until, reason=reason, for_seconds=for_seconds
            )
        self._down()

    async def snapshot(self, key: str) -> CircuitBreakerState:
        if self.up is not None:
            return await self.up.snapshot(key)
        self._down()

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        if self.up is not None:
            return await self.up.snapshot_all()
        self._down()

    async def reset(self, key: str | None = None) -> None:
        if self.up is not None:
            return await self.up.reset(key)
        self._down()


class TestFailoverOverADownStore(CircuitStateStoreContract):
    """Every answer comes from the fallback, which holds the contract by itself."""

    @pytest.fixture
    def state_store_url(self) -> str:
        return "memory://"  # used only to build the "other instance" of shared stores

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)

    @pytest_asyncio.fixture(loop_scope="function")
    async def state_store(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[CircuitStateStore]:
        clock = state_store_options["clock"]
        async with FailoverStateStore(DownStore(), clock=clock) as store:
            yield store


# --------------------------------------------------------------------------- specifics

POLICY = BreakerPolicy(consecutive_failures=3, minimum_calls=1_000)


def is_degraded(store: FailoverStateStore) -> bool:
    return store.degraded


async def test_the_fallback_starts_from_what_the_owner_knew_and_the_primary_is_retried(
    fake_clock: FakeClock,
) -> None:
    known = CircuitBreakerState(
        key="k", state=CircuitState.OPEN, generation=4, open_until_ts=fake_clock() + 60
    )
    seen: list[tuple[str, str | None, bool]] = []

    async def degraded(key: str | None, error: str, only_key: bool) -> None:
        assert "ConnectionRefusedError" in error
        seen.append(("degraded", key, only_key))

    async def recovered(key: str | None, only_key: bool) -> None:
        seen.append(("recovered", key, only_key))

    primary = DownStore()
    store = FailoverStateStore(
        primary,
        clock=fake_clock,
        retry_interval=5.0,
        known=lambda key: [known] if key in (None, "k") else [],
        on_degraded=degraded,
        on_recovered=recovered,
    )
    async with store:
        admission = await store.admit("k", POLICY)
        assert not admission.admitted and admission.state.generation == 4
        assert is_degraded(store) and seen == [("degraded", "k", False)]
        await store.snapshot("k")
        assert primary.attempts == 1  # not retried within the interval
        fake_clock.advance(5.0)
        await store.snapshot("k")
        assert primary.attempts == 2 and is_degraded(store)
        # the primary comes back: its state is adopted
        primary.up = MemoryStateStore(clock=fake_clock)
        fake_clock.advance(5.0)
        state = await store.snapshot("k")
        assert (state.state, state.generation) == (CircuitState.CLOSED, 0)
        assert not is_degraded(store)
        assert seen == [("degraded", "k", False), ("recovered", "k", False)]


class GatedForce(MemoryStateStore):
    """A memory store whose ``force`` waits for ``gate`` (already sent: it is answered
    whatever follows) and whose ``admit`` fails while ``down``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.down = False
        self.forcing = asyncio.Event()
        self.gate = asyncio.Event()

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return await super().admit(key, policy)

    async def force(self, key: str, state: CircuitState, **options: Any) -> CircuitBreakerState:
        self.forcing.set()
        await self.gate.wait()
        return await super().force(key, state, **options)


async def test_a_force_does_not_end_an_outage_that_began_while_it_was_made(
    fake_clock: FakeClock,
) -> None:
    # the force's answer was sent before the store failed another operation: it is no
    # sign the store is back (as a retry's would be), so the outage goes on
    seen: list[tuple[str, str | None]] = []

    async def degraded(key: str | None, error: str, only_key: bool) -> None:
        seen.append(("degraded", key))

    async def recovered(key: str | None, only_key: bool) -> None:
        seen.append(("recovered", key))

    primary = GatedForce(fake_clock)
    store = FailoverStateStore(
        primary, clock=fake_clock, on_degraded=degraded, on_recovered=recovered
    )
    async with store:

        def force(s: CircuitStateStore) -> Any:
            return s.force("k", CircuitState.FORCED_OPEN, reason="maintenance")

        forcing = asyncio.create_task(store.control("k", force, "force_open(k)"))
        await primary.forcing.wait()
        primary.down = True
        await store.admit("other", POLICY)  # the outage begins
        assert is_degraded(store)
        primary.gate.set()
        assert (await forcing).state is CircuitState.FORCED_OPEN
        assert is_degraded(store) and seen == [("degraded", "other")]
        # a later force, made while degraded, takes the store back as before
        await store.control("k", force, "force_open(k)")
        assert not is_degraded(store)
        assert seen == [("degraded", "other"), ("recovered", "k")]


class UnreadableKeys(MemoryStateStore):
    """A memory store that cannot read the stored state of the keys in ``broken``."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(clock=clock)
        self.broken: set[str] = set()

    async def _transact(self, key: str, fn: Any) -> Any:
        if key in self.broken:
            raise StateStoreError(f"the circuit state of {key!r} is unreadable", key=key)
        return await super()._transact(key, fn)


async def test_an_unreadable_key_runs_on_its_own_fallback_until_it_reads_again(
    fake_clock: FakeClock,
) -> None:
    seen: list[tuple[str, str | None, bool]] = []

    async def degraded(key: str | None, error: str, only_key: bool) -> None:
        seen.append(("degraded", key, only_key))

    async def recovered(key: str | None, only_key: bool) -> None:
        seen.append(("recovered", key, only_key))

    primary = UnreadableKeys(fake_clock)
    primary.broken.add("bad")
    store = FailoverStateStore(
        primary,
        clock=fake_clock,
        retry_interval=5.0,
        on_degraded=degraded,
        on_recovered=recovered,
    )
    async with store:
        forced = await store.force("bad", CircuitState.FORCED_OPEN, reason="local")
        assert forced.reason == "local"  # answered by the key's fallback
        await store.force("good", CircuitState.DISABLED)
        assert (await primary.snapshot("good")).state is CircuitState.DISABLED
        assert not is_degraded(store)  # the store as a whole is fine
        assert seen == [("degraded", "bad", True)]
        primary.broken.clear()
        assert (await store.snapshot("bad")).reason == "local"  # within the interval
        fake_clock.advance(5.0)
        assert (await store.snapshot("bad")).state is CircuitState.CLOSED  # the store's
        assert seen == [("degraded", "bad", True), ("recovered", "bad", True)]
