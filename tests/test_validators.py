"""
The values' field checks, seen through the public values they guard: one family of
validators, each value's errors in its own words (issue #13).
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from empathy_models import (
    BreakerPolicy,
    ConfigurationError,
    ExecutionContext,
    FallbackPolicy,
    LLMCallRecord,
    RetryPolicy,
    RoutingPolicy,
)
from empathy_models.backends import MemoryTelemetryBackend
from empathy_models.exceptions import RecordValidationError
from empathy_models.limits import Budget
from empathy_models.records import ModelPerformance


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
