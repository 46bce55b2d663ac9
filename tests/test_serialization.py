"""to_dict / from_dict: versioned, JSON-ready, tolerant of unknown keys, strict on values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from typing import Any

import attrs
import pytest
from hypothesis import given, strategies as st

from empathy_models import CircuitState, LLMCallRecord, ModelTier, Outcome, RoutingDecision
from empathy_models.exceptions import RecordValidationError
from empathy_models.records import (
    CandidateEvaluation,
    CircuitBreakerState,
    ConstraintStatus,
    ModelPerformance,
)
from empathy_models.serialization import SCHEMA_VERSION, from_dict, parse_datetime, to_dict

from ._fakes import OtherInt

T0 = datetime(2026, 3, 1, 12, 0, 0, 250_000, tzinfo=UTC)


def through_json(data: dict[str, Any]) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(json.dumps(data, allow_nan=False))
    return loaded


def a_call(**fields: Any) -> LLMCallRecord:
    base: dict[str, Any] = {
        "provider": "anthropic",
        "model": "m",
        "outcome": "success",
        "timestamp": T0,
    }
    return LLMCallRecord(**{**base, **fields})


def a_decision() -> RoutingDecision:
    return RoutingDecision(
        model="b",
        tier="capable",
        workflow="docs",
        stage="outline",
        constraints_met=False,
        reason="relaxed max_latency_ms",
        candidates=(
            CandidateEvaluation(model="a", sample_size=3, constraints={"max_cost": "unproven"}),
            CandidateEvaluation(
                model="b",
                sample_size=40,
                success_rate=0.95,
                success_rate_lower=0.83,
                success_rate_upper=0.99,
                constraints={
                    "max_cost": "eligible",
                    "max_latency_ms": "rejected",
                    "max_ttft_ms": "eligible",
                },
                reasons=("p95 latency 2100 ms > 2000 ms",),
                ttft_p50_ms=120.0,
                ttft_p95_ms=180.0,
            ),
        ),
        relaxed=("max_latency_ms",),
        max_latency_ms=2000.0,
        max_ttft_ms=300.0,
        policy_applied="relax",
        decided_at=T0,
    )


# --------------------------------------------------------------------------- shape


def test_to_dict_is_versioned_and_json_ready() -> None:
    rec = a_call(
        tier="cheap",
        circuit_state="half_open",
        fallback_chain=["x:y"],
        metadata={"n": 1, "ok": True},
    )
    data = rec.to_dict()
    assert next(iter(data)) == "v" and data["v"] == SCHEMA_VERSION
    assert data["timestamp"] == "2026-03-01T12:00:00.250000+00:00"
    assert (data["outcome"], data["tier"], data["circuit_state"]) == (
        "success",
        "cheap",
        "half_open",
    )
    assert data["fallback_chain"] == ["x:y"] and data["metadata"] == {"n": 1, "ok": True}
    assert through_json(data) == data


@pytest.mark.parametrize(
    "record",
    [
        a_call(),
        ModelPerformance(model="m", sample_size=4, successes=3, tier="premium", last_seen=T0),
        CircuitBreakerState(key="k", state="open", leases=[("l", 1.5)], window=[(1, 2, 1)]),
        a_decision(),
    ],
    ids=["LLMCallRecord", "ModelPerformance", "CircuitBreakerState", "RoutingDecision"],
)
def test_every_record_round_trips_through_json(record: Any) -> None:
    data = through_json(to_dict(record))
    assert from_dict(data, type(record)) == record
    assert type(record).from_dict(data) == record


def test_nested_records_come_back_as_records_and_enums() -> None:
    back = RoutingDecision.from_dict(through_json(a_decision().to_dict()))
    assert isinstance(back.candidates[1], CandidateEvaluation)
    assert back.candidates[1].constraints["max_latency_ms"] is ConstraintStatus.REJECTED
    assert back.candidates[1].constraints["max_ttft_ms"] is ConstraintStatus.ELIGIBLE
    assert (back.max_ttft_ms, back.candidates[1].ttft_p95_ms) == (300.0, 180.0)
    assert back.tier is ModelTier.CAPABLE


# --------------------------------------------------------------------------- tolerance


def test_unknown_keys_are_ignored() -> None:
    data = {**a_call().to_dict(), "added_in_v3": {"nested": [1, 2]}, "another": None}
    assert LLMCallRecord.from_dict(data) == a_call(call_id=data["call_id"])


def test_a_newer_version_is_accepted_when_its_fields_parse() -> None:
    data = {**a_call().to_dict(), "v": SCHEMA_VERSION + 1, "new_field": "x"}
    assert LLMCallRecord.from_dict(data).call_id == data["call_id"]


def test_a_missing_version_reads_as_the_current_one() -> None:
    data = a_call().to_dict()
    del data["v"]
    assert LLMCallRecord.from_dict(data).call_id == data["call_id"]


@pytest.mark.parametrize("version", [0, -1, "1", True, None, 1.0])
def test_a_bad_version_is_rejected(version: object) -> None:
    with pytest.raises(RecordValidationError, match="schema version 'v'") as info:
        LLMCallRecord.from_dict({**a_call().to_dict(), "v": version})
    assert info.value.path == "v"


def test_the_input_dict_is_not_modified() -> None:
    data = a_call().to_dict()
    snapshot = json.dumps(data, sort_keys=True)
    LLMCallRecord.from_dict(data)
    assert json.dumps(data, sort_keys=True) == snapshot


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-01T12:00:00.25Z", T0),
        ("2026-03-01T12:00:00.250000+00:00", T0),
        ("2026-03-01T14:00:00.250+02:00", T0),
    ],
)
def test_timestamps_parse_with_z_or_offsets_and_read_back_in_utc(
    text: str, expected: datetime
) -> None:
    rec = LLMCallRecord.from_dict({**a_call().to_dict(), "timestamp": text})
    assert rec.timestamp == expected and rec.timestamp.utcoffset() == timedelta(0)


def test_parse_datetime_accepts_epoch_seconds_and_datetimes() -> None:
    assert parse_datetime(T0.timestamp()) == T0
    assert parse_datetime(T0) is T0
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_datetime(["2026"])


def test_numbers_of_other_types_read_as_the_plain_numbers() -> None:
    # what a row of a pandas frame holds: numpy's numbers (an int64 is no int); they
    # were refused ("expected an integer, got np.int64(7)"), though the constructor
    # takes them
    plain = a_call(input_tokens=7, latency_ms=2.5, status_code=200, metadata={"n": 4})
    given = {
        **plain.to_dict(),
        "v": OtherInt(1),
        "input_tokens": OtherInt(7),
        "latency_ms": Decimal("2.5"),
        "status_code": OtherInt(200),
        "metadata": {"n": OtherInt(4)},
        "timestamp": OtherInt(int(T0.timestamp())),
    }
    record = LLMCallRecord.from_dict(given)
    assert record == attrs.evolve(plain, timestamp=T0.replace(microsecond=0))
    assert json.loads(json.dumps(record.to_dict()))["metadata"] == {"n": 4}
    performance = ModelPerformance.from_dict(
        {"model": "m", "sample_size": OtherInt(4), "avg_cost_usd": Fraction(1, 4)}
    )
    assert performance == ModelPerformance(model="m", sample_size=4, avg_cost_usd=0.25)


# --------------------------------------------------------------------------- corrupt input


@pytest.mark.parametrize(
    ("change", "path", "fragment"),
    [
        ({"latency_ms": -1}, "latency_ms", "must be a finite number >= 0"),
        ({"timestamp": "2026-03-01T12:00:00"}, "timestamp", "naive datetime"),
        ({"timestamp": "yesterday"}, "timestamp", "yesterday"),
        ({"outcome": "succeeded"}, "outcome", "expected one of"),
        ({"tier": "gold"}, "tier", "gold"),
        ({"input_tokens": "12"}, "input_tokens", "expected an integer"),
        ({"input_tokens": 12.5}, "input_tokens", "expected an integer"),
        ({"input_tokens": True}, "input_tokens", "expected an integer"),
        ({"cost_usd": "free"}, "cost_usd", "expected a number"),
        ({"fallback_used": "false"}, "fallback_used", "expected true or false"),
        ({"provider": None}, "provider", "expected a string"),
        ({"fallback_chain": "anthropic:a"}, "fallback_chain", "expected a list"),
        ({"fallback_chain": ["a", 2]}, "fallback_chain[1]", "expected a string"),
        ({"metadata": {"k": [1]}}, "metadata", "JSON scalar"),
        ({"metadata": "k=v"}, "metadata", "expected a mapping"),
    ],
)
def test_a_bad_value_reports_the_field_path(
    change: dict[str, Any], path: str, fragment: str
) -> None:
    with pytest.raises(RecordValidationError) as info:
        LLMCallRecord.from_dict({**a_call().to_dict(), **change})
    assert info.value.path == path
    assert f"'{path}'" in str(info.value) or path in str(info.value)
    assert fragment in str(info.value)
    assert str(info.value).startswith("LLMCallRecord")
    assert info.value.__cause__ is not None, "the converter's error is chained"


def test_a_missing_required_field_is_named() -> None:
    data = a_call().to_dict()
    del data["model"]
    with pytest.raises(RecordValidationError, match="missing required field 'model'") as info:
        LLMCallRecord.from_dict(data)
    assert info.value.path == "model"


@pytest.mark.parametrize("data", [["provider", "m"], "provider=m", None, 42])
def test_something_that_is_not_a_mapping_is_rejected(data: Any) -> None:
    with pytest.raises(RecordValidationError, match="expected a mapping"):
        LLMCallRecord.from_dict(data)


def test_an_exploration_kind_round_trips_and_is_checked() -> None:
    probe = attrs.evolve(a_decision(), exploration=True, exploration_kind="re-probe")
    assert RoutingDecision.from_dict(through_json(probe.to_dict())) == probe
    assert a_decision().to_dict()["exploration_kind"] is None
    data = {**probe.to_dict(), "exploration_kind": "curiosity"}
    with pytest.raises(RecordValidationError, match="one of unproven, warm-up") as info:
        RoutingDecision.from_dict(data)
    assert info.value.path == "exploration_kind"
    with pytest.raises(RecordValidationError, match="only set on an exploration decision"):
        RoutingDecision.from_dict({**probe.to_dict(), "exploration": False})


def test_nested_paths_name_the_element() -> None:
    data = a_decision().to_dict()
    data["candidates"][1]["sample_size"] = -1
    with pytest.raises(RecordValidationError) as info:
        RoutingDecision.from_dict(data)
    assert info.value.path == "candidates[1].sample_size"

    data = a_decision().to_dict()
    data["candidates"][0]["constraints"] = {"max_cost": "maybe"}
    with pytest.raises(RecordValidationError, match="not a valid ConstraintStatus") as info:
        RoutingDecision.from_dict(data)
    assert info.value.path == "candidates[0].constraints[max_cost]"  # the entry named


@pytest.mark.parametrize(
    ("leases", "path"),
    [
        ([["id-only"]], "leases[0]"),
        ([["id", "soon"]], "leases[0][1]"),
        ("id", "leases"),
    ],
)
def test_corrupt_circuit_state_dicts(leases: object, path: str) -> None:
    data = {**CircuitBreakerState(key="k").to_dict(), "leases": leases}
    with pytest.raises(RecordValidationError) as info:
        CircuitBreakerState.from_dict(data)
    assert info.value.path == path
    with pytest.raises(RecordValidationError, match=r"'state'.*expected one of") as bad_state:
        CircuitBreakerState.from_dict({"key": "k", "state": "ajar"})
    assert bad_state.value.path == "state"


# --------------------------------------------------------------------------- properties

texts = st.text(max_size=40)
names = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() != "")
amounts = st.floats(min_value=0.0, max_value=1e12, allow_nan=False, allow_infinity=False)
counts = st.integers(min_value=0, max_value=2**53)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(timedelta(hours=-8))]
)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=zones
)
scalars = st.none() | st.booleans() | st.integers() | texts | amounts
metadata = st.dictionaries(texts, scalars, max_size=5)


@st.composite
def call_records(draw: st.DrawFn) -> LLMCallRecord:
    return LLMCallRecord(
        provider=draw(names),
        model=draw(names),
        outcome=draw(st.sampled_from(Outcome)),
        call_id=draw(names),
        request_id=draw(st.none() | texts),
        timestamp=draw(moments),
        workflow=draw(st.none() | texts),
        stage=draw(st.none() | texts),
        task_type=draw(names),
        tier=draw(st.none() | st.sampled_from(ModelTier)),
        input_tokens=draw(counts),
        output_tokens=draw(counts),
        cost_usd=draw(amounts),
        actual_cost_usd=draw(st.none() | amounts),
        price_version=draw(st.none() | texts),
        latency_ms=draw(amounts),
        ttft_ms=draw(st.none() | amounts),
        error_type=draw(st.none() | texts),
        error_message=draw(st.none() | texts),
        status_code=draw(st.none() | st.integers(min_value=0, max_value=999)),
        attempt=draw(st.integers(min_value=1, max_value=100)),
        fallback_used=draw(st.booleans()),
        fallback_chain=draw(st.lists(texts, max_size=4).map(tuple)),
        original_provider=draw(st.none() | texts),
        original_model=draw(st.none() | texts),
        exploration=draw(st.booleans()),
        breaker_generation=draw(st.none() | counts),
        circuit_state=draw(st.none() | st.sampled_from(CircuitState)),
        user_id=draw(st.none() | texts),
        session_id=draw(st.none() | texts),
        metadata=draw(metadata),
        prompt_text=draw(st.none() | texts),
        response_text=draw(st.none() | texts),
    )


@st.composite
def breaker_states(draw: st.DrawFn) -> CircuitBreakerState:
    optional_ts = st.none() | amounts
    return CircuitBreakerState(
        key=draw(names),
        state=draw(st.sampled_from(CircuitState)),
        generation=draw(counts),
        consecutive_failures=draw(counts),
        window=draw(st.lists(st.tuples(counts, counts, counts), max_size=6).map(tuple)),
        open_count=draw(counts),
        opened_at_ts=draw(optional_ts),
        open_until_ts=draw(optional_ts),
        closed_at_ts=draw(optional_ts),
        last_failure_ts=draw(optional_ts),
        leases=draw(st.lists(st.tuples(names, amounts), max_size=4).map(tuple)),
        probe_successes=draw(counts),
        last_error=draw(st.none() | texts),
        reason=draw(st.none() | texts),
        updated_at_ts=draw(optional_ts),
    )


@given(call_records())
@pytest.mark.slow
def test_property_call_records_round_trip_through_json(record: LLMCallRecord) -> None:
    back = LLMCallRecord.from_dict(through_json(record.to_dict()))
    assert back == record
    assert back.timestamp.utcoffset() == timedelta(0)


@given(breaker_states())
def test_property_breaker_states_round_trip_through_json(state: CircuitBreakerState) -> None:
    assert CircuitBreakerState.from_dict(through_json(state.to_dict())) == state


@given(call_records(), st.dictionaries(st.text(min_size=1).map(lambda s: f"x_{s}"), scalars))
def test_property_unknown_keys_never_change_the_record(
    record: LLMCallRecord, extra: dict[str, Any]
) -> None:
    assert LLMCallRecord.from_dict({**extra, **record.to_dict()}) == record


def test_records_serialize_without_generating_code_after_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The exit hooks serialize records from a SIGTERM handler, which may interrupt the
    # main thread while cattrs generates a function; cattrs refuses to re-enter the
    # generation for the same class (RecursionError), so no record type may need one
    # after import, even after a plugin's type with a new mapping field (generating its
    # function empties cattrs' dispatch cache).
    import attrs
    import cattrs.converters

    from empathy_models.serialization import converter

    @attrs.frozen
    class PluginRecord:
        weights: dict[str, float]

    assert converter.unstructure(PluginRecord({"a": 1.0})) == {"weights": {"a": 1.0}}
    generated: list[type] = []
    for name in ("make_dict_unstructure_fn", "make_dict_structure_fn"):
        real = getattr(cattrs.converters, name)

        def spy(cl: type, *args: Any, _real: Any = real, **kwargs: Any) -> Any:
            generated.append(cl)
            return _real(cl, *args, **kwargs)

        monkeypatch.setattr(cattrs.converters, name, spy)
    for record in (a_call(metadata={"k": 1}), a_decision()):
        again = from_dict(through_json(to_dict(record)), type(record))
        assert again == record
    assert generated == []
