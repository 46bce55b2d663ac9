"""The QuotaStore and ResponseCache contracts, run against the built-in backends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_asyncio

from empathy_models.abc import QuotaStore
from empathy_models.limits import MemoryQuotaStore, RateGrant
from empathy_models.testing.contracts import QuotaStoreContract, ResponseCacheContract


class TestMemoryQuotaStore(QuotaStoreContract):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "memory://"


class TestSQLiteQuotaStore(QuotaStoreContract):
    @pytest.fixture
    def quota_store_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/quota.db"


class TestSQLiteMemoryQuotaStore(QuotaStoreContract):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "sqlite://:memory:"


class DefaultPushBack(MemoryQuotaStore):
    """A store with `QuotaStore`'s own `push_back`, as a third party's store has."""

    push_back = QuotaStore.push_back


class TestDefaultPushBackQuotaStore(QuotaStoreContract):
    @pytest.fixture
    def quota_store_url(self) -> str:
        return "memory://"

    @pytest_asyncio.fixture(loop_scope="function")
    async def quota_store(self) -> AsyncIterator[QuotaStore]:  # type: ignore[override]
        async with DefaultPushBack() as store:
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
