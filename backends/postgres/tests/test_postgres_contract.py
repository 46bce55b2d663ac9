"""The core contracts, run against a real PostgreSQL through the backends' URLs."""

from __future__ import annotations

import asyncpg
import pytest
from empathy_models_postgres import PostgresCircuitStateStore
from empathy_models_postgres._feed import application_name, channel_of

from empathy_models.abc import CircuitStateStore
from empathy_models.testing.contracts import (
    ChangeFeedContract,
    CircuitStateStoreContract,
    CutChangeFeed,
    TelemetryBackendContract,
)


class TestPostgresTelemetry(TelemetryBackendContract):
    """Each test gets its own schema in the EMPATHY_TEST_POSTGRES_DSN database."""

    @pytest.fixture
    def telemetry_url(self, postgres_url: str) -> str:
        return postgres_url


class TestPostgresStateStore(CircuitStateStoreContract):
    """Each test gets its own schema in the EMPATHY_TEST_POSTGRES_DSN database."""

    @pytest.fixture
    def state_store_url(self, postgres_url: str) -> str:
        return postgres_url


class TestPostgresChangeFeed(ChangeFeedContract):
    """The store's NOTIFY announcements, in this test's schema."""

    @pytest.fixture
    def state_store_url(self, postgres_url: str) -> str:
        return postgres_url

    @pytest.fixture
    def cut_change_feed(self, postgres_dsn: str) -> CutChangeFeed:
        async def cut(store: CircuitStateStore) -> None:
            assert isinstance(store, PostgresCircuitStateStore)
            name = application_name(channel_of(store._table))
            conn = await asyncpg.connect(postgres_dsn)
            try:
                ended = await conn.fetch(
                    "SELECT pg_terminate_backend(pid, 5000) AS ended "
                    "FROM pg_stat_activity WHERE application_name = $1",
                    name,
                )
                assert [row["ended"] for row in ended] == [True]
            finally:
                await conn.close()

        return cut
