"""The core CircuitStateStore contract, run against a real Redis through its URL."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from empathy_models_redis import RedisCircuitStateStore
from empathy_models_redis._feed import client_name

from empathy_models.abc import CircuitStateStore
from empathy_models.testing.contracts import (
    ChangeFeedContract,
    CircuitStateStoreContract,
    CutChangeFeed,
)


class TestRedisStateStore(CircuitStateStoreContract):
    """Each test gets its own key prefix in the EMPATHY_TEST_REDIS_URL database."""

    @pytest.fixture
    def state_store_url(self, redis_store_url: str) -> str:
        return redis_store_url


class TestRedisChangeFeed(ChangeFeedContract):
    """The store's pub/sub announcements, under this test's key prefix."""

    @pytest.fixture
    def state_store_url(self, redis_store_url: str) -> str:
        return redis_store_url

    @pytest.fixture
    def cut_change_feed(self, redis_url: str) -> CutChangeFeed:
        async def cut(store: CircuitStateStore) -> None:
            assert isinstance(store, RedisCircuitStateStore)
            name = client_name(store.channel)
            client = aioredis.Redis.from_url(redis_url)
            try:
                clients = [c for c in await client.client_list() if c.get("name") == name]
                assert len(clients) == 1, clients
                await client.client_kill_filter(_id=clients[0]["id"])
            finally:
                await client.aclose()

        return cut
