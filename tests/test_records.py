"""Records: invariants checked at construction, with errors that name the field."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import attrs
import pytest

from empathy_models import CircuitState, LLMCallRecord, ModelTier, Outcome, RoutingDecision
from empathy_models.exceptions import RecordValidationError
from empathy_models.records import (
    CandidateEvaluation,
    CircuitBreakerState,
    ConstraintStatus,
    ModelPerformance,
    OutcomeReport,
    Ticket,
    wilson_interval,
)

from ._fakes import OtherInt

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def call(**fields: Any) -> LLMCallRecord:
    base: dict[str, Any] = {"provider": "anthropic", "model": "m", "outcome": "success"}
    return LLMCallRecord(**{**base, **fields})


# --------------------------------------------------------------------------- LLMCallRecord


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        ("latency_ms", -1.0, ">= 0"),
        ("latency_ms", math.nan, "finite"),
        ("latency_ms", math.inf, "finite"),
        ("latency_ms", "12", "number"),
        ("ttft_ms", -0.5, ">= 0"),
        ("cost_usd", -0.01, ">= 0"),
        ("actual_cost_usd", -1, ">= 0"),
        ("input_tokens", -3, ">= 0"),
        ("output_tokens", 1.5, "integer"),
        ("input_tokens", True, "integer"),
        ("status_code", -1, ">= 0"),
        ("attempt", 0, ">= 1"),
        ("breaker_generation", -1, ">= 0"),
        ("provider", "", "non-empty"),
        ("model", "   ", "non-empty"),
        ("task_type", "", "non-empty"),
        ("workflow", 3, "string"),
        ("fallback_used", "yes", "bool"),
        ("exploration", 1, "bool"),
    ],
)
def test_a_bad_value_names_the_field_and_the_value(field: str, value: object, why: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        call(**{field: value})
    assert info.value.path == field
    assert field in str(info.value) and why in str(info.value)
    assert repr(value) in str(info.value)


def test_a_naive_timestamp_is_rejected_with_a_hint() -> None:
    with pytest.raises(RecordValidationError, match=r"timestamp is a naive datetime") as info:
        call(timestamp=datetime(2026, 3, 1, 12, 0))
    assert info.value.path == "timestamp"
    assert "datetime.now(UTC)" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_an_aware_timestamp_is_normalized_to_utc() -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    rec = call(timestamp=datetime(2026, 3, 1, 17, 30, tzinfo=india))
    assert rec.timestamp.utcoffset() == timedelta(0)
    assert rec.timestamp == T0


@pytest.mark.parametrize(
    "when",
    [
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, 30, tzinfo=timezone(timedelta(hours=-1))),
    ],
)
def test_an_aware_timestamp_that_utc_cannot_hold_is_a_validation_error(when: datetime) -> None:
    with pytest.raises(RecordValidationError, match="outside the datetimes UTC can hold"):
        call(timestamp=when)


def test_the_default_timestamp_is_now_in_utc() -> None:
    before = datetime.now(UTC)
    rec = call()
    assert before <= rec.timestamp <= datetime.now(UTC)
    assert rec.timestamp.tzinfo is not None and rec.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("field", "value", "enum_name"),
    [
        ("outcome", "succeeded", "Outcome"),
        ("tier", "enterprise", "ModelTier"),
        ("circuit_state", "ajar", "CircuitState"),
        ("outcome", 1, "Outcome"),
    ],
)
def test_an_unknown_enum_value_lists_the_allowed_ones(
    field: str, value: object, enum_name: str
) -> None:
    with pytest.raises(RecordValidationError) as info:
        call(**{field: value})
    message = str(info.value)
    assert info.value.path == field
    assert repr(value) in message and enum_name in message
    assert "expected one of" in message


def test_enum_values_are_read_case_insensitively_and_half_open_with_a_hyphen() -> None:
    rec = call(outcome="RATE_LIMITED", tier="Premium", circuit_state="half-open")
    assert rec.outcome is Outcome.RATE_LIMITED
    assert rec.tier is ModelTier.PREMIUM
    assert rec.circuit_state is CircuitState.HALF_OPEN


def test_list_fields_reject_strings_and_non_strings() -> None:
    with pytest.raises(RecordValidationError, match="list of strings"):
        call(fallback_chain="anthropic:a")
    with pytest.raises(RecordValidationError, match="list of strings"):
        call(fallback_chain=["a", 2])
    assert call(fallback_chain=["a", "b"]).fallback_chain == ("a", "b")


def test_records_are_frozen_and_metadata_is_read_only() -> None:
    rec = call(metadata={"team": "docs"})
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        rec.latency_ms = 5.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        rec.metadata["team"] = "other"  # type: ignore[index]
    source = {"k": 1}
    copied = call(metadata=source)
    source["k"] = 2
    assert copied.metadata["k"] == 1, "the record keeps its own copy"


def test_prompt_and_response_text_stay_out_of_the_repr() -> None:
    rec = call(prompt_text="SECRET PROMPT", response_text="SECRET ANSWER", error_message="boom")
    text = repr(rec)
    assert "SECRET" not in text
    assert "boom" in text


def test_derived_properties() -> None:
    rec = call(outcome="failure", attempt=3, input_tokens=10, output_tokens=5)
    assert (rec.success, rec.retry_count, rec.total_tokens) == (False, 2, 15)
    assert call().success


@pytest.mark.parametrize(
    ("outcome", "sample", "failure"),
    [
        (Outcome.SUCCESS, True, False),
        (Outcome.FAILURE, True, True),
        (Outcome.RATE_LIMITED, True, True),
        (Outcome.FATAL, True, True),
        (Outcome.IGNORED, False, False),
        (Outcome.NOT_SENT, False, False),
        (Outcome.CANCELLED, False, False),
        (Outcome.REJECTED, False, False),
    ],
)
def test_outcome_classes(outcome: Outcome, sample: bool, failure: bool) -> None:
    assert (outcome.is_sample, outcome.is_failure) == (sample, failure)


def test_the_original_field_set_is_representable() -> None:
    # the original project's LLMCallRecord, as its to_dict() wrote it
    original = {
        "call_id": "c-1",
        "timestamp": "2026-03-01T12:00:00+00:00",
        "workflow_name": "docs",
        "step_name": "outline",
        "user_id": "u",
        "session_id": "s",
        "task_type": "summarize",
        "provider": "anthropic",
        "tier": "capable",
        "model_id": "claude-sonnet",
        "input_tokens": 100,
        "output_tokens": 20,
        "estimated_cost": 0.0012,
        "actual_cost": 0.001,
        "latency_ms": 850,
        "fallback_used": True,
        "fallback_chain": ["anthropic:claude-opus"],
        "original_provider": "anthropic",
        "original_model": "claude-opus",
        "retry_count": 2,
        "circuit_breaker_state": "half-open",
        "success": False,
        "error_type": "ServerError",
        "error_message": "503",
        "metadata": {"k": "v"},
    }
    renamed = {
        "workflow_name": "workflow",
        "step_name": "stage",
        "model_id": "model",
        "estimated_cost": "cost_usd",
        "actual_cost": "actual_cost_usd",
        "circuit_breaker_state": "circuit_state",
    }
    fields: dict[str, Any] = {renamed.get(k, k): v for k, v in original.items()}
    fields["timestamp"] = datetime.fromisoformat(fields["timestamp"])
    fields["attempt"] = fields.pop("retry_count") + 1
    fields["outcome"] = "success" if fields.pop("success") else "failure"
    rec = LLMCallRecord(**fields)
    assert rec.retry_count == original["retry_count"]
    assert rec.success is original["success"]
    assert rec.circuit_state is CircuitState.HALF_OPEN
    assert (rec.workflow, rec.stage, rec.model) == ("docs", "outline", "claude-sonnet")
    assert (rec.cost_usd, rec.actual_cost_usd, rec.latency_ms) == (0.0012, 0.001, 850)
    assert dict(rec.metadata) == original["metadata"]


# --------------------------------------------------------------------------- ModelPerformance


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(9, 10)
    assert low == pytest.approx(0.5958, abs=1e-4)
    assert high == pytest.approx(0.9821, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 10)[0] == 0.0
    with pytest.raises(ValueError, match="between 0 and n=10"):
        wilson_interval(11, 10)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, -1), r"n must be >= 0, got -1"),
        ((3, -5), r"n must be >= 0, got -5"),
        ((1.5, 3), r"successes must be an integer, got 1.5"),
        ((True, 2), r"successes must be an integer, got True"),
        ((1, 2.0), r"n must be an integer, got 2.0"),
        ((-1, 0), r"successes must be >= 0, got -1"),
        ((1, 2**80), r"n must be < 2\*\*63"),
        ((1, 2, -1.96), r"z must be a finite number > 0, got -1.96"),
        ((1, 2, 0), r"z must be a finite number > 0, got 0"),
        ((1, 2, math.nan), r"z must be a finite number > 0, got nan"),
        ((1, 2, math.inf), r"z must be a finite number > 0, got inf"),
    ],
)
def test_wilson_interval_refuses_what_is_no_count_or_quantile(
    args: tuple[Any, ...], message: str
) -> None:
    # before, a negative n or z gave an interval ((0, 1), or a certain (0.5, 0.5)), and
    # a huge n an OverflowError naming no argument
    with pytest.raises(ValueError, match=message):
        wilson_interval(*args)


def test_model_performance_rates_and_quality() -> None:
    perf = ModelPerformance(model="m", sample_size=10, successes=9, avg_cost_usd=0.02)
    assert perf.success_rate == 0.9 and perf.failures == 1
    assert perf.success_rate_bounds == wilson_interval(9, 10)
    assert perf.quality_score == pytest.approx(perf.success_rate_lower * 100 - 2.0)
    empty = ModelPerformance(model="m")
    assert empty.success_rate == 0.0 and empty.success_rate_bounds == (0.0, 1.0)


def test_model_performance_rejects_more_successes_than_samples() -> None:
    with pytest.raises(RecordValidationError, match=r"successes \(3\).*sample_size \(2\)") as info:
        ModelPerformance(model="m", sample_size=2, successes=3)
    assert info.value.path == "successes"


def test_model_performance_rejects_naive_first_seen() -> None:
    with pytest.raises(RecordValidationError, match="first_seen is a naive datetime"):
        ModelPerformance(model="m", first_seen=datetime(2026, 1, 1))


# --------------------------------------------------------------------------- circuit state


@pytest.mark.parametrize(
    ("state", "is_open"),
    [
        (CircuitState.CLOSED, False),
        (CircuitState.DISABLED, False),
        (CircuitState.OPEN, True),
        (CircuitState.FORCED_OPEN, True),
        (CircuitState.HALF_OPEN, True),
    ],
)
def test_is_open_per_state(state: CircuitState, is_open: bool) -> None:
    assert CircuitBreakerState(key="k", state=state).is_open is is_open


def test_circuit_state_presents_times_as_utc_datetimes() -> None:
    ts = T0.timestamp()
    state = CircuitBreakerState(
        key="anthropic",
        state="open",
        consecutive_failures=5,
        opened_at_ts=ts,
        open_until_ts=ts + 60,
        last_failure_ts=ts,
        leases=[("lease-1", ts + 30)],
        window=[(1, 4, 3), (2, 6, 2)],
    )
    assert state.opened_at == T0 and state.opened_at.tzinfo is not None
    assert state.open_until == T0 + timedelta(seconds=60)
    assert state.last_failure == T0
    assert (state.failure_count, state.probes_in_flight) == (5, 1)
    assert (state.window_calls, state.window_failures) == (10, 5)
    assert CircuitBreakerState(key="k").opened_at is None


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"key": ""}, "key"),
        ({"key": "k", "generation": -1}, "generation"),
        ({"key": "k", "state": "unknown"}, "state"),
        ({"key": "k", "leases": [("only-id",)]}, "leases"),
        ({"key": "k", "leases": "id"}, "leases"),
        ({"key": "k", "window": [(1, 2)]}, "window"),
        ({"key": "k", "opened_at_ts": -5.0}, "opened_at_ts"),
        # these were taken: a lease that never expires (NaN), one given as text, a
        # bucket's count below 0, a fractional one cut to an int, a flag as a count
        ({"key": "k", "leases": [("id", math.nan)]}, "leases"),
        ({"key": "k", "leases": [("id", -1.0)]}, "leases"),
        ({"key": "k", "leases": [("id", "soon")]}, "leases"),
        ({"key": "k", "window": [(1, -5, 0)]}, "window"),
        ({"key": "k", "window": [(1.5, 2, 0)]}, "window"),
        ({"key": "k", "window": [(1, True, 0)]}, "window"),
    ],
)
def test_circuit_state_invariants(fields: dict[str, Any], path: str) -> None:
    with pytest.raises(RecordValidationError) as info:
        CircuitBreakerState(**fields)
    assert info.value.path == path


def test_circuit_state_numbers_of_other_types_are_kept_plain() -> None:
    state = CircuitBreakerState(
        key="k", window=[(OtherInt(9), OtherInt(4), 1)], leases=[("id", Fraction(5, 2))]
    )
    assert state.window == ((9, 4, 1),) and type(state.window[0][0]) is int
    assert state.leases == (("id", 2.5),)


def test_outcome_report_checks_retry_after_and_converts_the_outcome() -> None:
    ticket = Ticket(key="k", generation=0)
    assert OutcomeReport(ticket=ticket, outcome="failure").outcome is Outcome.FAILURE
    with pytest.raises(RecordValidationError) as info:
        OutcomeReport(ticket=ticket, outcome="failure", retry_after=-1.0)
    assert info.value.path == "retry_after"


# --------------------------------------------------------------------------- routing


def test_candidate_status_is_the_worst_constraint() -> None:
    eligible = CandidateEvaluation(model="a", constraints={"max_cost": "eligible"})
    unproven = CandidateEvaluation(
        model="b", constraints={"max_cost": "eligible", "min_success_rate": "unproven"}
    )
    rejected = CandidateEvaluation(
        model="c", constraints={"max_cost": "rejected", "min_success_rate": "unproven"}
    )
    excluded = CandidateEvaluation(model="d", excluded=True, reasons=["circuit open"])
    assert eligible.status is ConstraintStatus.ELIGIBLE
    assert unproven.status is ConstraintStatus.UNPROVEN
    assert rejected.status is ConstraintStatus.REJECTED
    assert excluded.status is ConstraintStatus.REJECTED
    assert eligible.constraints["max_cost"] is ConstraintStatus.ELIGIBLE


def test_candidate_constraints_reject_unknown_statuses() -> None:
    with pytest.raises(RecordValidationError, match="'maybe' is not a valid ConstraintStatus"):
        CandidateEvaluation(model="a", constraints={"max_cost": "maybe"})


def test_routing_decision_validates() -> None:
    with pytest.raises(RecordValidationError) as info:
        RoutingDecision(model="")
    assert info.value.path == "model"
    with pytest.raises(RecordValidationError, match="decided_at is a naive datetime"):
        RoutingDecision(model="m", decided_at=datetime(2026, 1, 1))
    with pytest.raises(RecordValidationError) as bounds:
        CandidateEvaluation(model="m", success_rate=1.5)
    assert bounds.value.path == "success_rate"


@pytest.mark.parametrize(
    "metadata",
    [
        {"when": datetime(2026, 1, 1, tzinfo=UTC)},  # to_dict/SQLite turn it into a string
        {"ids": [1, 2]},  # to_dict writes it, from_dict refuses it
        {1: "x"},  # the key comes back as "1"
        {"ratio": float("nan")},  # not JSON: PostgreSQL's jsonb refuses it
        {"ratio": float("inf")},
    ],
    ids=["datetime", "list", "int-key", "nan", "inf"],
)
def test_metadata_that_would_not_round_trip_is_rejected(metadata: dict[object, object]) -> None:
    with pytest.raises(RecordValidationError, match="metadata"):
        call(metadata=metadata)


def test_json_scalar_metadata_round_trips() -> None:
    rec = call(metadata={"s": "x", "i": 2**70, "f": 2.5, "b": False, "n": None})
    assert LLMCallRecord.from_dict(json.loads(json.dumps(rec.to_dict(), allow_nan=False))) == rec


def test_every_text_field_of_a_record_is_made_storable() -> None:
    """`storable` escapes every ``str`` field: the list it checks names them all."""
    from empathy_models.backends._storable import _TEXT_FIELDS

    text = {
        a.name
        for a in attrs.fields(LLMCallRecord)
        if a.type in (str, str | None, "str", "str | None")
    }
    assert set(_TEXT_FIELDS) == text


def test_with_fields_converts_and_validates_only_what_changes() -> None:
    state = CircuitBreakerState(key="k", generation=2, window=[(60, 5, 1)])
    new = state.with_fields(state="open", window=[[120, 3, 3]], open_until_ts=10.0)
    assert new == attrs.evolve(state, state="open", window=[(120, 3, 3)], open_until_ts=10.0)
    assert new.state is CircuitState.OPEN and new.window == ((120, 3, 3),)
    assert new.generation == 2 and state.state is CircuitState.CLOSED  # a copy
    with pytest.raises(RecordValidationError):
        state.with_fields(generation=-1)
    with pytest.raises(TypeError, match="key"):
        state.with_fields(key="other")
    with pytest.raises(TypeError, match="nope"):
        state.with_fields(nope=1)


def test_with_fields_keeps_numbers_of_other_types_plain_and_leaves_the_original() -> None:
    state = CircuitBreakerState(key="k", generation=2, opened_at_ts=5.0)
    new = state.with_fields(generation=OtherInt(3), opened_at_ts=Fraction(15, 2))
    assert (new.generation, new.opened_at_ts) == (3, 7.5)
    assert type(new.generation) is int and type(new.opened_at_ts) is float
    assert (state.generation, state.opened_at_ts) == (2, 5.0)  # the original untouched
