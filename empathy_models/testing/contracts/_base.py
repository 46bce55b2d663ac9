"""
What the parts of `TelemetryBackendContract` share: the record builders, the round-trip
check and the base class that holds the capabilities (``stores_records``,
``keeps_evidence``) and the skips they lead to.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, NoReturn

import attrs
import pytest

from ...records import CircuitState, LLMCallRecord, ModelTier, Outcome


def _fail_override(cls: type, fixture: str) -> NoReturn:
    pytest.fail(
        f"{cls.__name__} must override the {fixture!r} fixture "
        "(return the URL of an empty backend)",
        pytrace=False,
    )


def _record(
    ts: datetime,
    *,
    model: str = "model-a",
    provider: str = "provider-a",
    outcome: Outcome = Outcome.SUCCESS,
    workflow: str | None = "wf",
    stage: str | None = "stage",
    **fields: Any,
) -> LLMCallRecord:
    return LLMCallRecord(
        provider=provider,
        model=model,
        outcome=outcome,
        timestamp=ts,
        workflow=workflow,
        stage=stage,
        **fields,
    )


def _base_time() -> datetime:
    # Relative to now (and whole seconds) so that no backend treats the data as
    # expired, yet far enough back that nothing collides with "now".
    return datetime.now(UTC).replace(microsecond=0) - timedelta(days=20)


def _rich_record(ts: datetime) -> LLMCallRecord:
    """A record in which every field differs from its default, with awkward text."""
    return LLMCallRecord(
        provider="anthropic",
        model="claude-'quoted'-\"model\"",
        outcome=Outcome.RATE_LIMITED,
        call_id=f"call-{uuid.uuid4().hex}",
        request_id="req-0001",
        timestamp=ts.replace(microsecond=123456),
        workflow="wörkflow; DROP TABLE calls;--",
        stage="stage\nwith newline",
        task_type="summarize",
        tier=ModelTier.PREMIUM,
        input_tokens=1_234_567,
        output_tokens=8_901,
        cost_usd=0.123456789,
        actual_cost_usd=0.0625,
        price_version="2026-01-01",
        latency_ms=1234.5678,
        ttft_ms=12.25,
        error_type="RateLimitedError",
        error_message="429 Too Many Requests; retry after 'soon' \u2014 \u6f22\u5b57",
        status_code=429,
        attempt=3,
        fallback_used=True,
        fallback_chain=("anthropic:claude-a", "openai:gpt-b"),
        original_provider="openai",
        original_model="gpt-b",
        exploration=True,
        routing_propensity=0.125,
        breaker_generation=7,
        circuit_state=CircuitState.HALF_OPEN,
        user_id="user-1",
        session_id="session-1",
        metadata={"text": "x", "int": 3, "float": 2.5, "flag": True, "nothing": None},
        prompt_text="hello \U0001f30d",
        response_text="bye\tthen\r\nnothing",
    )


def _assert_same_record(got: LLMCallRecord, want: LLMCallRecord) -> None:
    diffs = [
        f"{f.name}: stored {getattr(want, f.name)!r}, read back {getattr(got, f.name)!r}"
        for f in attrs.fields(LLMCallRecord)
        if getattr(got, f.name) != getattr(want, f.name)
    ]
    assert not diffs, "fields changed in the round trip:\n  " + "\n  ".join(diffs)
    assert got.timestamp.utcoffset() == timedelta(0), "timestamps must read back in UTC"


class _TelemetryTests:
    """The capabilities every group of telemetry tests reads, and the skips they lead to."""

    stores_records: ClassVar[bool] = True
    """False for a backend that accepts records and keeps none (``null://``)."""

    keeps_evidence: ClassVar[bool] = True
    """False for a backend whose ``evidence()`` raises `NotImplementedError`."""

    def _needs_records(self) -> None:
        if not self.stores_records:
            pytest.skip(f"{type(self).__name__}: the backend keeps no records")

    def _needs_evidence(self) -> None:
        self._needs_records()
        if not self.keeps_evidence:
            pytest.skip(f"{type(self).__name__}: the backend keeps no evidence rollups")
