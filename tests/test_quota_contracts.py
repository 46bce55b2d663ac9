"""The QuotaStore and ResponseCache contracts, run against the built-in backends."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from empathy_models.abc import QuotaStore
from empathy_models.limits import MemoryQuotaStore, RateGrant
from empathy_models.testing.contracts import (
    QuotaStoreContract,
    ResponseCacheContract,
    StepQuotaClock,
    stepping,
)


class SteppedWallClock:
    """The wall clock, stepped when a test says so (`set` moves it, as NTP would)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def set(self, now: float) -> None:
        self.offset += now - self()


class _WallClocked(QuotaStoreContract):
    """A store on the wall clock, built with one that the clock-step tests step."""

    @pytest.fixture
    def wall_clock(self) -> SteppedWallClock:
        return SteppedWallClock()

    @pytest.fixture
    def quota_store_options(self, wall_clock: SteppedWallClock) -> dict[str, Any]:
        return {"clock": wall_clock}

    @pytest.fixture
    def step_quota_clock(self, wall_clock: SteppedWallClock) -> StepQuotaClock:
        return stepping(wall_clock)


class TestMemoryQuotaStore(_WallClocked):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "memory://"


class TestSQLiteQuotaStore(_WallClocked):
    @pytest.fixture
    def quota_store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/quota.db"


class TestSQLiteMemoryQuotaStore(_WallClocked):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "sqlite://:memory:"


class DefaultPushBack(MemoryQuotaStore):
    """A store with `QuotaStore`'s own `push_back`, as a third party's store has."""

    push_back = QuotaStore.push_back


class TestDefaultPushBackQuotaStore(_WallClocked):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "memory://"

    @pytest_asyncio.fixture(loop_scope="function")
    async def quota_store(  # type: ignore[override]
        self, wall_clock: SteppedWallClock
    ) -> AsyncIterator[QuotaStore]:
        async with DefaultPushBack(clock=wall_clock) as store:
            yield store


async def test_the_default_push_back_moves_a_store_that_names_no_place_to_the_reset() -> None:
    class NoPlace(DefaultPushBack):
        async def acquire(self, key: str, **kw: Any) -> RateGrant:
            return attrs.evolve(await super().acquire(key, **kw), place=None)

    args = {"cost": 1.0, "interval": 10.0, "burst": 1.0, "max_wait": 0.0}
    async with NoPlace() as store:
        assert (await store.acquire("r", **args)).granted  # the schedule ends 10 s ahead
        for _ in range(3):
            await store.push_back("r", seconds=20.0)
        refused = await store.acquire("r", **args)
    assert not refused.granted and 19.0 < refused.wait <= 20.0


class TestMemoryResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self) -> str:
        return "memory://"


class TestSQLiteResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/cache.db"
