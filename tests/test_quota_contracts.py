"""The QuotaStore and ResponseCache contracts, run against the built-in backends."""

from __future__ import annotations

from pathlib import Path

import pytest

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


class TestMemoryResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self) -> str:
        return "memory://"


class TestSQLiteResponseCache(ResponseCacheContract):
    @pytest.fixture
    def cache_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path}/cache.db"
