"""The core contracts, run against a real PostgreSQL through the backends' URLs."""

from __future__ import annotations

import json

import asyncpg
import pytest
from empathy_models_postgres import PostgresCircuitStateStore
from empathy_models_postgres._feed import application_name, channel_of

from empathy_models import BreakerPolicy
from empathy_models.abc import CircuitStateStore
from empathy_models.records import CircuitBreakerState
from empathy_models.serialization import from_dict, to_dict
from empathy_models.testing.contracts import (
    ChangeFeedContract,
    CircuitStateStoreContract,
    CutChangeFeed,
    StepStateClock,
    TelemetryBackendContract,
    written_ahead,
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

    @pytest.fixture
    def step_state_clock(self, state_store: CircuitStateStore, postgres_dsn: str) -> StepStateClock:
        """clock_timestamp() cannot be stepped: every key's times move later instead."""
        assert isinstance(state_store, PostgresCircuitStateStore)
        table = state_store._table

        async def step(seconds: float, policy: BreakerPolicy) -> float:
            later = -seconds
            buckets = round(later / policy.bucket_seconds)
            assert buckets * policy.bucket_seconds == pytest.approx(later)
            conn = await asyncpg.connect(postgres_dsn)
            try:
                for row in await conn.fetch(f"SELECT key, state::text FROM {table}"):
                    state = from_dict(json.loads(row["state"]), CircuitBreakerState)
                    moved = json.dumps(to_dict(written_ahead(state, later, buckets)))
                    await conn.execute(
                        f"UPDATE {table} SET state = $2::jsonb WHERE key = $1", row["key"], moved
                    )
            finally:
                await conn.close()
            return later

        return step


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
