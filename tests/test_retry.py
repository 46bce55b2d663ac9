"""RetryPolicy: pure delay arithmetic, jitter bounds, Retry-After and what is retryable."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta

import pytest
from hypothesis import given, settings, strategies as st

from empathy_models import (
    CircuitOpenError,
    CircuitState,
    ConfigurationError,
    Outcome,
    RateLimitedError,
    RetryPolicy,
)
from empathy_models.exceptions import (
    AuthenticationError,
    ContentPolicyError,
    ContextWindowExceededError,
    InvalidRequestError,
    InvalidResponseError,
    ModelNotFoundError,
    OverloadedError,
    ProviderConnectionError,
    ProviderTimeoutError,
    ServerError,
)


def test_defaults_match_the_original_contract() -> None:
    """3 attempts, 1 s base, x2, 30 s cap, jitter on."""
    policy = RetryPolicy()
    assert (
        policy.max_attempts,
        policy.base_delay,
        policy.multiplier,
        policy.max_delay,
        policy.jitter,
    ) == (3, 1.0, 2.0, 30.0, True)


def test_delays_are_exponential_and_deterministic_without_jitter() -> None:
    """max_attempts counts calls, so there is one delay fewer than attempts."""
    assert RetryPolicy(jitter=False).delays() == (1.0, 2.0)
    assert RetryPolicy(max_attempts=8, jitter=False).delays() == (
        1.0,
        2.0,
        4.0,
        8.0,
        16.0,
        30.0,
        30.0,
    )


def test_max_delay_caps_every_delay() -> None:
    policy = RetryPolicy(
        max_attempts=6, base_delay=1.0, multiplier=3.0, max_delay=5.0, jitter=False
    )
    assert policy.delays() == (1.0, 3.0, 5.0, 5.0, 5.0)


def test_constant_backoff_is_capped_too() -> None:
    """multiplier=1 is a constant delay, still capped by ``max_delay``."""
    policy = RetryPolicy(
        max_attempts=3, base_delay=10.0, multiplier=1.0, max_delay=4.0, jitter=False
    )
    assert policy.delays() == (4.0, 4.0)


def test_huge_attempt_numbers_do_not_overflow() -> None:
    assert RetryPolicy(jitter=False).backoff(10_000) == 30.0


@pytest.mark.parametrize("attempts", [0, -1, True, 1.5, "3"])
def test_max_attempts_below_one_or_not_int_is_rejected(attempts: object) -> None:
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.max_attempts .* got"):
        RetryPolicy(max_attempts=attempts)  # type: ignore[arg-type]


def test_max_attempts_one_means_one_call_and_no_delay() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert policy.delays() == ()
    assert not policy.should_retry(ServerError("boom", status=500), 1)


def test_none_makes_one_call() -> None:
    policy = RetryPolicy.none()
    assert policy.max_attempts == 1
    assert policy.delays() == ()
    assert not policy.should_retry(ProviderTimeoutError("slow"), 1)


def test_should_retry_stops_at_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    err = ServerError("boom", status=500)
    assert [policy.should_retry(err, n) for n in (1, 2, 3)] == [True, True, False]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("base_delay", -1.0),
        ("base_delay", float("nan")),
        ("max_delay", float("inf")),
        ("multiplier", 0.5),
        ("jitter_mode", "half"),
        ("max_retry_after", -2.0),
        ("retry_on", ("timeout",)),
        ("retry_on", (42,)),
        ("jitter", 1),
    ],
)
def test_invalid_fields_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**{field: value})  # type: ignore[arg-type]
    assert field in str(info.value)
    assert repr(value).strip("()',") in str(info.value)


def test_durations_accept_timedelta() -> None:
    policy = RetryPolicy(
        base_delay=timedelta(milliseconds=250),
        max_delay=timedelta(seconds=2),
        max_retry_after=timedelta(minutes=1),
        jitter=False,
    )
    assert policy.delays() == (0.25, 0.5)
    assert policy.retry_after_limit == 60.0


def test_equal_jitter_stays_within_half_to_full_delay() -> None:
    policy = RetryPolicy(max_attempts=8, jitter=True, jitter_mode="equal")
    rng = random.Random(1234)
    for attempt in range(1, 8):
        base = policy.backoff(attempt)
        for _ in range(200):
            delay = policy.compute_delay(attempt, rng=rng)
            assert delay is not None
            assert base / 2 <= delay <= base


def test_full_jitter_stays_within_zero_to_full_delay_and_uses_the_whole_range() -> None:
    policy = RetryPolicy(max_attempts=4, jitter=True, jitter_mode="full")
    rng = random.Random(99)
    draws = [policy.compute_delay(3, rng=rng) for _ in range(500)]
    assert all(d is not None and 0.0 <= d <= 4.0 for d in draws)
    # full jitter reaches below the equal-jitter floor
    assert min(d for d in draws if d is not None) < 2.0


def test_seeded_rng_makes_jittered_delays_reproducible() -> None:
    first = RetryPolicy(max_attempts=6, rng=random.Random(7)).delays()
    second = RetryPolicy(max_attempts=6, rng=random.Random(7)).delays()
    other = RetryPolicy(max_attempts=6, rng=random.Random(8)).delays()
    assert first == second
    assert first != other
    assert first != RetryPolicy(max_attempts=6, jitter=False).delays()


def test_rng_does_not_take_part_in_equality() -> None:
    assert RetryPolicy(rng=random.Random(1)) == RetryPolicy(rng=random.Random(2))


def test_retry_after_is_a_floor() -> None:
    """Wait at least what the provider asked, and at least the backoff."""
    policy = RetryPolicy(jitter=False)
    assert policy.compute_delay(1, 7.5) == 7.5
    assert policy.compute_delay(2, 0.5) == 2.0


def test_retry_after_wins_over_jitter() -> None:
    policy = RetryPolicy(jitter=True, rng=random.Random(3))
    for _ in range(100):
        delay = policy.compute_delay(1, 5.0)
        assert delay == 5.0


def test_retry_after_beyond_the_cap_means_give_up_on_the_route() -> None:
    policy = RetryPolicy(max_delay=30.0, jitter=False)
    assert policy.compute_delay(1, 30.0) == 30.0
    assert policy.compute_delay(1, 30.01) is None


def test_max_retry_after_is_a_separate_cap() -> None:
    policy = RetryPolicy(max_delay=10.0, max_retry_after=120.0, jitter=False)
    assert policy.compute_delay(1, 100.0) == 100.0
    assert policy.compute_delay(1, 121.0) is None
    # the backoff itself is still capped by max_delay
    assert policy.backoff(20) == 10.0


@pytest.mark.parametrize(
    "exc",
    [
        ProviderTimeoutError("no answer"),
        ProviderConnectionError("refused"),
        ServerError("internal", status=500),
        ServerError("bad gateway", status=502),
        OverloadedError("overloaded", status=529),
        RateLimitedError("slow down", status=429, retry_after=1.0),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status", "")),
)
def test_transient_errors_are_retryable(exc: Exception) -> None:
    assert RetryPolicy().is_retryable(exc)


@pytest.mark.parametrize(
    "exc",
    [
        InvalidRequestError("bad", status=400),
        ContextWindowExceededError("too long", status=400),
        ContentPolicyError("refused", status=400),
        AuthenticationError("who are you", status=401),
        AuthenticationError("forbidden", status=403),
        ModelNotFoundError("no such model", status=404),
        InvalidResponseError("not json"),
        ValueError("a bug"),
        CircuitOpenError("anthropic", state=CircuitState.OPEN, retry_after=3.0),
        asyncio.CancelledError(),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "status", "")),
)
def test_client_fatal_and_unknown_errors_are_not_retryable(exc: BaseException) -> None:
    assert not RetryPolicy().is_retryable(exc)


def test_message_text_does_not_decide_retryability() -> None:
    """The original matched substrings: 'rate'/'limit'/'500' in a message meant retry."""
    policy = RetryPolicy()
    assert not policy.is_retryable(InvalidRequestError("context length limit: 500 tokens"))
    assert not policy.is_retryable(ValueError("rate limit reached at 500 rpm"))
    assert policy.is_retryable(ProviderTimeoutError(""))


def test_retry_on_accepts_outcome_classes() -> None:
    policy = RetryPolicy(retry_on=(Outcome.FAILURE,))
    assert policy.is_retryable(InvalidResponseError("truncated body"))
    assert not policy.is_retryable(RateLimitedError("429", status=429))
    assert RetryPolicy(retry_on=("rate_limited",)).is_retryable(RateLimitedError("429"))


def test_invalid_requests_are_never_retried_even_when_listed() -> None:
    policy = RetryPolicy(retry_on=(InvalidRequestError, Outcome.IGNORED, Exception))
    assert not policy.is_retryable(InvalidRequestError("bad", status=400))
    assert not policy.is_retryable(ContextWindowExceededError("too long"))


def test_retry_on_accepts_a_single_class() -> None:
    policy = RetryPolicy(retry_on=ProviderTimeoutError)  # type: ignore[arg-type]
    assert (ProviderTimeoutError,) == policy.retry_on


@settings(max_examples=200, deadline=None)
@given(
    attempts=st.integers(min_value=1, max_value=12),
    base=st.floats(min_value=0.0, max_value=60.0, allow_nan=False),
    multiplier=st.floats(min_value=1.0, max_value=10.0, allow_nan=False),
    cap=st.floats(min_value=0.0, max_value=120.0, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32),
    mode=st.sampled_from(["equal", "full"]),
)
def test_jittered_delays_never_exceed_the_unjittered_backoff_which_never_exceeds_the_cap(
    attempts: int, base: float, multiplier: float, cap: float, seed: int, mode: str
) -> None:
    plain = RetryPolicy(
        max_attempts=attempts, base_delay=base, multiplier=multiplier, max_delay=cap, jitter=False
    )
    jittered = RetryPolicy(
        max_attempts=attempts,
        base_delay=base,
        multiplier=multiplier,
        max_delay=cap,
        jitter_mode=mode,  # type: ignore[arg-type]
        rng=random.Random(seed),
    )
    fixed = plain.delays()
    assert len(fixed) == attempts - 1
    assert all(0.0 <= d <= cap for d in fixed)
    assert list(fixed) == sorted(fixed)  # non-decreasing
    for d, ceiling in zip(jittered.delays(), fixed, strict=True):
        floor = ceiling / 2 if mode == "equal" else 0.0
        assert floor <= d <= ceiling
