"""The core QuotaStore contract, run against a real Redis through its URL."""

from __future__ import annotations

import pytest

from empathy_models.testing.contracts import QuotaStoreContract, ResponseCacheContract


class TestRedisQuotaStore(QuotaStoreContract):
    """Each test gets its own key prefix in the EMPATHY_TEST_REDIS_URL database."""

    @pytest.fixture
    def quota_store_url(self, redis_store_url: str) -> str:
        return redis_store_url


class TestRedisResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, redis_store_url: str) -> str:
        return redis_store_url
