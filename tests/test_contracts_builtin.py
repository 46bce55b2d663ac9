"""The contract suites run against the built-in backends, built from their URLs."""

from __future__ import annotations

from typing import Any

import pytest

from empathy_models.testing.clock import FakeClock
from empathy_models.testing.contracts import (
    AdvanceClock,
    CircuitStateStoreContract,
    TelemetryBackendContract,
)


class TestMemoryTelemetry(TelemetryBackendContract):
    @pytest.fixture
    def telemetry_url(self) -> str:
        return "memory://"


class TestNullTelemetry(TelemetryBackendContract):
    stores_records = False

    @pytest.fixture
    def telemetry_url(self) -> str:
        return "null://"


class TestMemoryStateStore(CircuitStateStoreContract):
    """Time comes from an injected FakeClock: the time-dependent tests take no time."""

    @pytest.fixture
    def state_store_url(self) -> str:
        return "memory://"

    @pytest.fixture
    def state_store_options(self, fake_clock: FakeClock) -> dict[str, Any]:
        return {"clock": fake_clock}

    @pytest.fixture
    def advance_clock(self, fake_clock: FakeClock) -> AdvanceClock:
        return fake_clock.sleep


class TestNullStateStore(CircuitStateStoreContract):
    keeps_state = False

    @pytest.fixture
    def state_store_url(self) -> str:
        return "null://"
