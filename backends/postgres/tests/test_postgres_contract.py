"""The core contracts, run against a real PostgreSQL through the backends' URLs."""

from __future__ import annotations

import pytest

from empathy_models.testing.contracts import (
    CircuitStateStoreContract,
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
