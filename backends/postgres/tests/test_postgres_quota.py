"""The core QuotaStore contract, run against a real PostgreSQL through its URL."""

from __future__ import annotations

import pytest

from empathy_models.testing.contracts import QuotaStoreContract, ResponseCacheContract


class TestPostgresQuotaStore(QuotaStoreContract):
    """Each test works in its own schema of the EMPATHY_TEST_POSTGRES_DSN database."""

    @pytest.fixture
    def quota_store_url(self, postgres_url: str) -> str:
        return postgres_url


class TestPostgresResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, postgres_url: str) -> str:
        return postgres_url
