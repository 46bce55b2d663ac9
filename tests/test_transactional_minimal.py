"""
A `TransactionalStateStore` needs only an atomic `_transact` and `_load_all` (the
README's promise to implementers): a dict behind one lock, with nothing else written,
runs the whole state-store contract.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import pytest_asyncio

from empathy_models.abc import CircuitStateStore, TransactionalStateStore
from empathy_models.records import CircuitBreakerState
from empathy_models.testing.clock import FakeClock
from empathy_models.testing.contracts import (
    AdvanceClock,
    CircuitStateStoreContract,
    StepStateClock,
    stepping,
)

T = TypeVar("T")


class DictStore(TransactionalStateStore):
    """The smallest transactional store: states in a dict, one lock for atomicity."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = asyncio.Lock()
        self._states: dict[str, CircuitBreakerState] = {}

    async def _transact(
        self,
        key: str,
        fn: Callable[[CircuitBreakerState | None, float], tuple[CircuitBreakerState | None, T]],
    ) -> T:
        async with self._lock:
            current = self._states.get(key)
            new, result = fn(current, self._clock())
            if new is not None and new is not current:
                self._states[key] = new
            return result

    async def _load_all(self) -> list[CircuitBreakerState]:
        async with self._lock:
            return list(self._states.values())


class TestMinimalTransactionalStore(CircuitStateStoreContract):
    @pytest.fixture
    def state_store_url(self) -> str:
        return "memory://"  # unused: the store is built below

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep

    @pytest.fixture
    def step_state_clock(self, fake_clock: FakeClock) -> StepStateClock:
        return stepping(fake_clock)

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest_asyncio.fixture(loop_scope="function")
    async def state_store(
        self, state_store_url: str, state_store_options: dict[str, Any]
    ) -> AsyncIterator[CircuitStateStore]:
        async with DictStore(state_store_options["clock"]) as store:
            yield store
