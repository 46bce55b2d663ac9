"""
The values' field checks, seen through the public values they guard: one family of
validators, each value's errors in its own words (issue #13).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from empathy_models import (
    AdaptiveModelRouter,
    BreakerPolicy,
    CircuitBreaker,
    CircuitState,
    ConfigurationError,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    ModelInfo,
    ModelRegistry,
    RetryPolicy,
    RoutingPolicy,
    telemetry_from_url,
)
from empathy_models.backends import MemoryStateStore, MemoryTelemetryBackend
from empathy_models.exceptions import RecordValidationError
from empathy_models.limits import Budget, RateLimit
from empathy_models.records import ModelPerformance
from empathy_models.testing import FakeLLMServer
from tests._fakes import KEY, OtherInt, ShownFloat, http_executor


class _Float(float):
    """A float subclass (numpy's float64 is one): a number like any other."""


class _Int(int):
    """An int subclass (an IntEnum member is one)."""


def _record(**fields: Any) -> LLMCallRecord:
    return LLMCallRecord(**{"provider": "p", "model": "m", "outcome": "success", **fields})


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _record(latency_ms=-1.0), "latency_ms must be a finite number >= 0, got -1.0"),
        (lambda: _record(latency_ms=math.nan), "latency_ms must be a finite number >= 0, got nan"),
        (lambda: _record(latency_ms=math.inf), "latency_ms must be a finite number >= 0, got inf"),
        (lambda: _record(latency_ms=True), "latency_ms must be a number, got True"),
        (lambda: _record(latency_ms="1"), "latency_ms must be a number, got '1'"),
        (lambda: _record(input_tokens=1.0), "input_tokens must be an integer, got 1.0"),
        (lambda: _record(input_tokens=-1), "input_tokens must be >= 0, got -1"),
        (lambda: _record(input_tokens=2**63), f"input_tokens must be < 2**63, got {2**63}"),
        (lambda: _record(attempt=0), "attempt must be an integer >= 1 and < 2**63, got 0"),
        (
            lambda: _record(routing_propensity=1.5),
            "routing_propensity must be a number between 0 and 1, got 1.5",
        ),
        (lambda: _record(provider=" "), "provider must be a non-empty string, got ' '"),
        (lambda: _record(workflow=3), "workflow must be a string or None, got 3"),
        (lambda: _record(fallback_used=1), "fallback_used must be a bool, got 1"),
        (lambda: ModelPerformance(model="m", tier=3), "tier 3 is not a valid ModelTier"),
    ],
)
def test_a_record_names_the_field_and_the_value(build: Any, message: str) -> None:
    with pytest.raises(RecordValidationError) as caught:
        build()
    assert str(caught.value).startswith(message)
    assert caught.value.path == message.split(" ", 1)[0]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: BreakerPolicy(recovery_seconds=0),
            "BreakerPolicy.recovery_seconds must be > 0, got 0",
        ),
        # NaN is out of range; an infinity is in range but not finite
        (
            lambda: BreakerPolicy(recovery_seconds=math.nan),
            "BreakerPolicy.recovery_seconds must be > 0, got nan",
        ),
        (
            lambda: BreakerPolicy(recovery_seconds=math.inf),
            "BreakerPolicy.recovery_seconds must be finite, got inf",
        ),
        (
            lambda: BreakerPolicy(failure_rate_threshold=0),
            "BreakerPolicy.failure_rate_threshold must be in (0, 1], got 0",
        ),
        (
            lambda: BreakerPolicy(minimum_calls=2.0),  # type: ignore[arg-type]
            "BreakerPolicy.minimum_calls must be an integer >= 1, got 2.0",
        ),
        (
            lambda: ExecutionContext(timeout=-1),
            "ExecutionContext.timeout must be a finite number > 0, got -1",
        ),
        (
            lambda: ExecutionContext(timeout="60"),  # type: ignore[arg-type]
            "ExecutionContext.timeout must be a number or None, got '60'",
        ),
        (
            lambda: ExecutionContext(max_tokens=2_000_000),
            "ExecutionContext.max_tokens must be at most 1,000,000, got 2000000",
        ),
        (
            lambda: ExecutionContext(record_text=1),  # type: ignore[arg-type]
            "ExecutionContext.record_text must be True or False, got 1",
        ),
        (
            lambda: FallbackPolicy(max_routes=0),
            "FallbackPolicy.max_routes must be an integer >= 1, got 0",
        ),
        (lambda: RoutingPolicy(z=0), "z must be a finite number > 0, got 0"),
        (
            lambda: RoutingPolicy(explore_rate=math.inf),
            "explore_rate must be a finite number >= 0 and <= 1, got inf",
        ),
        (
            lambda: RoutingPolicy(objective="fastest"),  # type: ignore[arg-type]
            "objective must be 'cheapest' or 'most_reliable', got 'fastest'",
        ),
        # counts are integers: a float (even a whole one) is refused here, not by a
        # router's start
        (
            lambda: RoutingPolicy(seed_stage_limit=1000.0),  # type: ignore[arg-type]
            "seed_stage_limit must be an integer >= 0, got 1000.0",
        ),
        (
            lambda: RoutingPolicy(latency_min_samples=2.5),  # type: ignore[arg-type]
            "latency_min_samples must be an integer >= 1, got 2.5",
        ),
        (
            lambda: RetryPolicy(max_retry_after=-1),
            "RetryPolicy.max_retry_after must be a finite number of seconds >= 0, got -1.0",
        ),
        (
            lambda: RetryPolicy(jitter_mode="half"),  # type: ignore[arg-type]
            "RetryPolicy.jitter_mode must be 'equal' or 'full', got 'half'",
        ),
        (
            lambda: Budget(limit_usd=10_000_000),
            "Budget.limit_usd must be a finite number of dollars >= 0 (at most 9,007,199), "
            "got 10000000",
        ),
        (lambda: MemoryTelemetryBackend(capacity=0), "capacity must be an integer >= 1, got 0"),
    ],
)
def test_a_setting_names_its_owner_field_and_value(build: Any, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        build()
    assert str(caught.value) == message


def test_exact_numbers_subclasses_and_none_pass_where_allowed() -> None:
    record = _record(
        latency_ms=_Float(2.5),
        input_tokens=_Int(3),
        cost_usd=0,
        ttft_ms=None,
        routing_propensity=1,
        status_code=2**63 - 1,
    )
    assert (record.latency_ms, record.input_tokens, record.cost_usd) == (2.5, 3, 0)
    assert BreakerPolicy(recovery_seconds=_Float(0.5), failure_rate_threshold=1).recovery_seconds
    # an infinite cap is allowed where a field is not required to be finite
    assert BreakerPolicy(min_retry_after_open=math.inf).min_retry_after_open == math.inf
    assert ExecutionContext(timeout=None, max_cost=0).max_cost == 0
    assert Budget(limit_usd=2**53 / 1_000_000_000).limit_usd > 9_007_199


def test_booleans_are_not_numbers() -> None:
    with pytest.raises(ConfigurationError, match=r"must be an integer >= 1, got True"):
        FallbackPolicy(max_routes=True)
    with pytest.raises(RecordValidationError, match=r"must be an integer, got False"):
        _record(output_tokens=False)


# --------------------------------------------------------------------------- other numbers


def _model(**fields: Any) -> ModelInfo:
    entry = {
        "id": "m",
        "provider": "p",
        "tier": "cheap",
        "input_price_per_mtok": 1.0,
        "output_price_per_mtok": 2.0,
        "context_window": 1000,
        "max_output_tokens": 100,
        **fields,
    }
    return ModelInfo(**entry)


@pytest.mark.parametrize(
    ("build", "name", "plain"),
    [
        (lambda: RateLimit(rpm=OtherInt(500)), "rpm", 500),  # type: ignore[arg-type]
        (
            lambda: ExecutionContext(max_tokens=OtherInt(64)),  # type: ignore[arg-type]
            "max_tokens",
            64,
        ),
        (
            lambda: ExecutionContext(timeout=Fraction(3, 2)),  # type: ignore[arg-type]
            "timeout",
            1.5,
        ),
        (
            lambda: ExecutionContext(max_cost=Decimal("0.25")),  # type: ignore[arg-type]
            "max_cost",
            0.25,
        ),
        (lambda: ExecutionContext(temperature=ShownFloat(0.5)), "temperature", 0.5),
        (lambda: FallbackPolicy(max_routes=OtherInt(2)), "max_routes", 2),  # type: ignore[arg-type]
        (
            lambda: RetryPolicy(max_attempts=OtherInt(2)),  # type: ignore[arg-type]
            "max_attempts",
            2,
        ),
        (lambda: RetryPolicy(base_delay=OtherInt(2)), "base_delay", 2.0),
        (
            lambda: BreakerPolicy(minimum_calls=OtherInt(3)),  # type: ignore[arg-type]
            "minimum_calls",
            3,
        ),
        (lambda: BreakerPolicy(recovery_seconds=ShownFloat(0.5)), "recovery_seconds", 0.5),
        (
            lambda: RoutingPolicy(latency_min_samples=OtherInt(5)),  # type: ignore[arg-type]
            "latency_min_samples",
            5,
        ),
        (
            lambda: RoutingPolicy(window_days=Decimal(2)),  # type: ignore[arg-type]
            "window_days",
            2.0,
        ),
        (lambda: Budget(limit_usd=Decimal("10.5")), "limit_usd", 10.5),  # type: ignore[arg-type]
        (lambda: Budget(limit_usd=1, window=OtherInt(3600)), "window", 3600.0),
        (lambda: _model(input_price_per_mtok=OtherInt(3)), "input_price_per_mtok", 3.0),
        (lambda: _model(output_price_per_mtok=Fraction(1, 4)), "output_price_per_mtok", 0.25),
        (lambda: _model(context_window=OtherInt(2000)), "context_window", 2000),
        (lambda: _model(tpm=OtherInt(9000)), "tpm", 9000),
        (lambda: _record(input_tokens=OtherInt(3)), "input_tokens", 3),
        (lambda: _record(latency_ms=Fraction(1, 4)), "latency_ms", 0.25),
        (lambda: _record(cost_usd=ShownFloat(0.5)), "cost_usd", 0.5),
        (
            lambda: ModelPerformance(model="m", sample_size=OtherInt(4)),  # type: ignore[arg-type]
            "sample_size",
            4,
        ),
    ],
)
def test_a_number_of_another_type_is_kept_as_the_plain_number(
    build: Any, name: str, plain: float
) -> None:
    # numpy's int64 (not an int) was refused as no integer, and its float64 (a float
    # subclass) kept as given, to be shown as np.float64(...) wherever the value went
    value = getattr(build(), name)
    assert value == plain
    assert type(value) is type(plain)


def test_metadata_numbers_of_other_types_are_kept_as_plain_numbers() -> None:
    given = {"batch": OtherInt(7), "share": Decimal("0.5"), "score": ShownFloat(0.25), "n": _Int(2)}
    plain = {"batch": 7, "share": 0.5, "score": 0.25, "n": 2}
    for metadata in (
        ExecutionContext(metadata=given).metadata,
        _record(metadata=given).metadata,
    ):
        assert dict(metadata) == plain
        assert [type(v) for v in metadata.values()] == [int, float, float, int]
    assert json.loads(json.dumps(_record(metadata=given).to_dict()))["metadata"] == plain


def test_a_number_of_another_type_keeps_every_rule_of_its_field() -> None:
    with pytest.raises(ConfigurationError, match=r"RateLimit\.rpm must be an integer >= 1"):
        RateLimit(rpm=OtherInt(0))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"must be a finite number > 0, got Decimal"):
        ExecutionContext(timeout=Decimal("NaN"))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"max_tokens must be an integer >= 1, got F"):
        # a whole Fraction is no integer either
        ExecutionContext(max_tokens=Fraction(4, 2))  # type: ignore[arg-type]
    with pytest.raises(RecordValidationError, match=r"cost_usd must be a finite number >= 0"):
        _record(cost_usd=Fraction(10**400))  # past the largest float
    with pytest.raises(ConfigurationError, match=r"metadata\['n'\] must be a str, int, float"):
        ExecutionContext(metadata={"n": 1j})


async def test_a_run_given_numbers_of_other_types_records_plain_numbers(tmp_path: Path) -> None:
    # what a caller holding numpy's numbers passes: each used and recorded as the plain one
    model = _model(id="gpt-fake-mini", provider="openai", input_price_per_mtok=OtherInt(1))
    registry = ModelRegistry(models=[model], price_version="other-numbers-1")
    context = ExecutionContext(
        tier="cheap",
        max_tokens=OtherInt(64),  # type: ignore[arg-type]
        temperature=Decimal(0),  # type: ignore[arg-type]
        timeout=ShownFloat(30.0),
        metadata={"batch": OtherInt(7), "share": ShownFloat(0.5)},
    )
    url = f"sqlite:///{tmp_path}/calls.db"
    async with FakeLLMServer(api_key=KEY) as server:
        limits = {"openai": RateLimit(rpm=OtherInt(6000))}  # type: ignore[arg-type]
        options: dict[str, Any] = {"seed": OtherInt(3), "top_p": Fraction(1, 2)}
        async with http_executor(
            server, registry, telemetry_store=url, rate_limits=limits
        ) as executor:
            response = await executor.run("hello", context, **options)
        request = server.last_request("gpt-fake-mini")
    assert request is not None
    assert (request.body["max_tokens"], request.body["seed"], request.body["top_p"]) == (64, 3, 0.5)
    assert type(response.cost_usd) is float and response.cost_usd > 0
    async with telemetry_from_url(url) as telemetry:
        [record] = await telemetry.recent()
    assert dict(record.metadata) == {"batch": 7, "share": 0.5}
    assert record.cost_usd == response.cost_usd


async def test_arguments_of_other_number_types_are_used_as_plain_numbers() -> None:
    two: Any = OtherInt(2)
    breaker = CircuitBreaker(provider_open_models=two, flush_interval=ShownFloat(0.25))
    assert type(breaker.provider_open_models) is int
    await breaker.aclose()
    router = AdaptiveModelRouter(refresh_interval=OtherInt(30))  # type: ignore[arg-type]
    assert router.refresh_interval == 30.0 and type(router.refresh_interval) is float
    decide: Any = router.get_best_model
    limits = {"max_cost": 0.5, "min_success_rate": 0.5, "max_latency_ms": 900, "max_tokens": 10}
    plain = decide("wf", "s", on_no_match="relax", input_tokens=100, **limits)
    other = decide(
        "wf",
        "s",
        on_no_match="relax",
        input_tokens=OtherInt(100),
        max_cost=Decimal("0.5"),
        min_success_rate=Fraction(1, 2),
        max_latency_ms=ShownFloat(900),
        max_tokens=OtherInt(10),
    )
    assert other.model == plain.model
    retry = RetryPolicy(base_delay=1.0, jitter=False)
    assert retry.backoff(two) == retry.backoff(2)
    cost = _model().cost(OtherInt(1000), OtherInt(10))  # type: ignore[arg-type]
    assert cost == _model().cost(1000, 10) and type(cost) is float
    async with MemoryTelemetryBackend() as telemetry:
        await telemetry.record(_record())
        assert len(await telemetry.recent(limit=OtherInt(5))) == 1  # type: ignore[arg-type]


async def test_a_forced_open_span_and_a_key_ttl_of_other_number_types_are_taken() -> None:
    # both refused before: "key_ttl must be a number of seconds above 0 or None, got
    # OtherInt(3600)", "for_seconds must be a finite number of seconds >= 0"
    spans: list[tuple[Any, float]] = [(OtherInt(60), 60.0), (Decimal("0.5"), 0.5)]
    async with MemoryStateStore(key_ttl=OtherInt(3600)) as store:  # type: ignore[arg-type]
        for span, seconds in spans:
            forced = await store.force("k", CircuitState.FORCED_OPEN, for_seconds=span)
            assert forced.open_until_ts is not None and forced.opened_at_ts is not None
            assert forced.open_until_ts - forced.opened_at_ts == pytest.approx(seconds)
            await store.reset("k")


def test_a_router_seeded_with_another_integer_type_draws_as_with_the_plain_one() -> None:
    # random.Random refuses numpy's int64: the router raised a bare TypeError ("The
    # only supported seed types are: None, int, float, str, bytes, and bytearray")
    decide: list[Any] = [
        AdaptiveModelRouter(seed=seed).get_best_model  # type: ignore[arg-type]
        for seed in (7, OtherInt(7))
    ]
    plain, other = ([d("wf", "s").model for _ in range(20)] for d in decide)
    assert other == plain
    with pytest.raises(ConfigurationError, match=r"seed must be an integer or None, got \["):
        AdaptiveModelRouter(seed=[7])  # type: ignore[arg-type]
