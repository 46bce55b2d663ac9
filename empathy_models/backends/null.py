"""
Backends that keep nothing: for services that want no telemetry and no breaker state.

`NullTelemetryBackend` accepts records and forgets them (aggregations are empty).
`NullStateStore` admits every call and never trips: a breaker over it is a pass-through.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from .. import circuit
from ..abc import CircuitStateStore, TelemetryBackend
from ..circuit import BreakerPolicy
from ..evidence import EvidenceBatch
from ..exceptions import RecordValidationError
from ..records import (
    Admission,
    CircuitBreakerState,
    CircuitState,
    LLMCallRecord,
    ModelPerformance,
    OutcomeReport,
    Ticket,
)
from ._plugin import BackendPlugin

__all__ = ["NullStateStore", "NullTelemetryBackend"]


class NullTelemetryBackend(TelemetryBackend):
    """Accepts records and keeps none; `accepted` counts them."""

    def __init__(self) -> None:
        self.accepted = 0

    def __repr__(self) -> str:
        return f"NullTelemetryBackend(accepted={self.accepted})"

    @property
    def stores_records(self) -> bool:
        return False

    async def record_many(self, records: Sequence[LLMCallRecord]) -> None:
        self._check_open()
        for r in records:
            if not isinstance(r, LLMCallRecord):
                raise RecordValidationError(f"expected an LLMCallRecord, got {type(r).__name__}")
        self.accepted += len(records)

    async def _aggregate(
        self,
        *,
        workflow: str | None,
        stage: str | None,
        since: datetime | None,
        until: datetime | None,
        per_stage: bool,
    ) -> list[ModelPerformance]:
        return []

    async def _recent(
        self,
        *,
        limit: int,
        workflow: str | None,
        stage: str | None,
        model: str | None,
        since: datetime | None,
        until: datetime | None,
        samples_only: bool,
    ) -> list[LLMCallRecord]:
        return []

    async def _evidence(
        self, *, since: datetime | None, until: datetime | None, after_version: int
    ) -> EvidenceBatch:
        return EvidenceBatch(buckets=(), version=0)

    async def _purge(self, *, before: datetime) -> int:
        return 0


class NullStateStore(CircuitStateStore):
    """Admits everything, remembers nothing: every key reads as CLOSED."""

    def __repr__(self) -> str:
        return "NullStateStore()"

    @property
    def in_process(self) -> bool:
        """True (see `MemoryStateStore.in_process`; a subclass is assumed to wait)."""
        return type(self) is NullStateStore

    async def admit(self, key: str, policy: BreakerPolicy) -> Admission:
        self._check_open()
        self.checked_key(key)
        state = circuit.initial_state(key)
        return Admission(admitted=True, state=state, ticket=Ticket(key=key, generation=0))

    async def record(
        self, key: str, policy: BreakerPolicy, reports: Sequence[OutcomeReport]
    ) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        return circuit.initial_state(key)

    async def force(
        self,
        key: str,
        state: CircuitState,
        *,
        until: datetime | None = None,
        reason: str | None = None,
        for_seconds: float | None = None,
    ) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        self.checked_force_end(until, for_seconds)
        self.checked_reason(reason)
        return circuit.initial_state(key)

    async def snapshot(self, key: str) -> CircuitBreakerState:
        self._check_open()
        self.checked_key(key)
        return circuit.initial_state(key)

    async def snapshot_all(self) -> list[CircuitBreakerState]:
        self._check_open()
        return []

    async def reset(self, key: str | None = None) -> None:
        self._check_open()
        if key is not None:
            self.checked_key(key)


PLUGIN = BackendPlugin(
    schemes=("null",),
    package="empathy-models",
    telemetry=lambda url: NullTelemetryBackend(),
    state_store=lambda url: NullStateStore(),
)
