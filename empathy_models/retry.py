"""
How often to try one route again, and how long to wait in between.

`RetryPolicy` is a pure value: it computes delays and answers "is this error worth
another try?", and never sleeps itself.  The executor does the sleeping, through an
injectable ``sleep`` function, so tests never wait.

Names say what they count: ``max_attempts`` is the number of calls made to one route,
the first one included.  ``max_attempts=1`` means one call and no retry; ``0`` is
rejected (it would make no call at all).

Delays, with the defaults (``base_delay=1.0``, ``multiplier=2.0``, ``max_delay=30.0``)
and ``jitter=False``, are 1 s after the first failed attempt, 2 s after the second,
4 s, 8 s, ... capped at 30 s.  With jitter (the default) each delay is drawn uniformly
from ``[d/2, d]`` (``jitter_mode="equal"``) or ``[0, d]`` (``"full"``) with the policy's
``random.Random`` (pass a seeded one for reproducible delays).

A ``Retry-After`` hint from the provider (a 429, or a 503 that sends one) is honoured:
the wait is at least the hint.  When the hint is longer than ``max_retry_after``
(default: ``max_delay``) the policy answers ``None`` ("do not wait here"), and the
executor falls back to the next route instead of sleeping.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from datetime import timedelta
from typing import Final, Literal

from attrs import field, frozen

from ._validators import (
    check,
    failure,
    instance_of,
    integer,
    number,
    one_of,
    plain_number,
    shown,
)
from .exceptions import (
    ConfigurationError,
    ProviderConnectionError,
    ProviderError,
    ProviderTimeoutError,
    RateLimitedError,
    ServerError,
)
from .outcomes import classify_error
from .records import Outcome

__all__ = ["DEFAULT_RETRY_ON", "RetryPolicy"]

RetryOn = type[BaseException] | Outcome

DEFAULT_RETRY_ON: tuple[RetryOn, ...] = (
    ProviderTimeoutError,
    ProviderConnectionError,
    ServerError,
    RateLimitedError,
)
"""
What is retried by default: timeouts (a 408, and a 409: a lock timeout, as the official SDKs
retry it), connection errors (a 499 included: a request a gateway, or Gemini, cancelled on
the way), 5xx (overload included) and 429, unless the provider said
``x-should-retry: false``.

Never retried by default: 400 / context window / content policy (the same request
fails the same way), 401 / 403 / 404 (the route is wrong, the executor falls back),
malformed responses and errors outside the provider error tree.
"""


def _seconds(value: object) -> object:
    # durations accept float | timedelta; anything else is left to the validator
    if isinstance(value, timedelta):
        return value.total_seconds()
    plain = plain_number(value)  # an integer of any kind, a Decimal: a plain number
    if plain is None or plain.__class__ is float:
        return value if plain is None else plain
    try:
        return float(plain)
    except OverflowError:  # no float holds it: the validator refuses it as it is
        return value


def _seconds_opt(value: object) -> object:
    return None if value is None else _seconds(value)


_fail = failure(ConfigurationError, owner="RetryPolicy")
_SECONDS_TYPE: Final = "must be a number of seconds (float or timedelta)"
_SECONDS_RANGE: Final = "must be a finite number of seconds >= 0"
# the converters have made every int or timedelta a float by now
_non_negative_seconds = number(_fail, low=0, type_why=_SECONDS_TYPE, why=_SECONDS_RANGE)
_non_negative_seconds_opt = number(
    _fail, low=0, optional=True, type_why=_SECONDS_TYPE, why=_SECONDS_RANGE
)
_attempts = integer(
    _fail,
    low=1,
    why="must be an integer >= 1 (it counts calls, the first included; "
    "use RetryPolicy.none() for a single call)",
)
_multiplier = number(
    _fail, low=1.0, type_why="must be a number", why="must be a finite number >= 1.0"
)
_jitter_mode = one_of(_fail, ("equal", "full"), why="must be 'equal' or 'full'")
_bool = instance_of(_fail, bool, why="must be True or False")
_arg_fail = failure(ConfigurationError)
_attempt_arg = integer(_arg_fail, low=1, why="must be an integer >= 1")
_retry_after_arg = number(_arg_fail, finite=False, why="must be seconds")


def _retry_on(value: Iterable[object]) -> tuple[RetryOn, ...]:
    if isinstance(value, type | Outcome | str):
        value = (value,)
    try:
        given = list(value)
    except TypeError:
        raise ConfigurationError(
            "RetryPolicy.retry_on must be exception classes or Outcome values (one or an "
            f"iterable of them), got {shown(value)}"
        ) from None
    items: list[RetryOn] = []
    for item in given:
        if isinstance(item, Outcome):
            items.append(item)
        elif isinstance(item, str):
            try:
                items.append(Outcome(item))
            except ValueError:
                raise ConfigurationError(
                    f"RetryPolicy.retry_on: {shown(item)} is not an Outcome "
                    f"(expected one of {', '.join(o.value for o in Outcome)})"
                ) from None
        elif isinstance(item, type) and issubclass(item, BaseException):
            items.append(item)
        else:
            raise ConfigurationError(
                f"RetryPolicy.retry_on entries must be exception classes or Outcome values, "
                f"got {shown(item)}"
            )
    return tuple(items)


@frozen(kw_only=True)
class RetryPolicy:
    """
    Retries of one route: how many calls, which errors, and how long to wait.

    Args:
        max_attempts: calls made to one route, the first included (``>= 1``).
        base_delay: the wait after the first failed attempt, in seconds (or a
            `~datetime.timedelta`).
        multiplier: growth of the wait per further attempt (``>= 1``).
        max_delay: cap of the computed backoff, in seconds.
        jitter: randomize each wait (default true) to spread retries of many clients.
        jitter_mode: ``"equal"`` draws from ``[d/2, d]``, ``"full"`` from ``[0, d]``.
        retry_on: exception classes (matched with ``isinstance``) and `Outcome` classes
            (matched through `empathy_models.outcomes.classify_error`) that are worth
            another try.  `Outcome.IGNORED` and `Outcome.CANCELLED` are never retried,
            whatever is listed.
        max_retry_after: the longest ``Retry-After`` the policy will wait for, in
            seconds; ``None`` means ``max_delay``.  Longer hints make `compute_delay`
            answer ``None``: give up on this route rather than sleep.
        rng: the random source of the jitter; pass ``random.Random(seed)`` for
            reproducible delays.  It does not take part in equality.

    The policy never sleeps and holds no per-call state, so one instance is safe to
    share between tasks (the jitter draws share ``rng``).

    Raises:
        ConfigurationError: a bad value of any field, naming the field and the value.
    """

    max_attempts: int = field(default=3, validator=_attempts)
    base_delay: float = field(default=1.0, converter=_seconds, validator=_non_negative_seconds)
    multiplier: float = field(default=2.0, converter=_seconds, validator=_multiplier)
    max_delay: float = field(default=30.0, converter=_seconds, validator=_non_negative_seconds)
    jitter: bool = field(default=True, validator=_bool)
    jitter_mode: Literal["equal", "full"] = field(default="equal", validator=_jitter_mode)
    retry_on: tuple[RetryOn, ...] = field(default=DEFAULT_RETRY_ON, converter=_retry_on)
    max_retry_after: float | None = field(
        default=None, converter=_seconds_opt, validator=_non_negative_seconds_opt
    )
    rng: random.Random = field(factory=random.Random, eq=False, repr=False)

    @classmethod
    def none(cls) -> RetryPolicy:
        """A policy that makes exactly one call per route and never waits."""
        return cls(max_attempts=1, base_delay=0.0, max_delay=0.0, jitter=False)

    @property
    def retry_after_limit(self) -> float:
        """The longest ``Retry-After`` honoured (seconds): ``max_retry_after`` or ``max_delay``."""
        return self.max_delay if self.max_retry_after is None else self.max_retry_after

    def backoff(self, attempt: int) -> float:
        """
        The un-jittered wait after failed attempt number ``attempt`` (1-based), in seconds.

        Returns:
            ``base_delay * multiplier ** (attempt - 1)``, capped at ``max_delay``.

        Raises:
            ConfigurationError: ``attempt < 1``.
        """
        attempt = check(_attempt_arg, "attempt", attempt)
        if self.base_delay == 0.0 or self.max_delay == 0.0:
            return 0.0
        # compared in log space, each term apart, so that neither a huge attempt number
        # nor extreme delays can overflow (or underflow) a float
        exponent = attempt - 1
        if self.multiplier > 1.0:
            growth = exponent * math.log(self.multiplier)
            log_delay = math.log(self.base_delay) + growth
            if log_delay >= math.log(self.max_delay):
                return self.max_delay
            if growth > 700.0:  # multiplier ** exponent alone would overflow
                return min(math.exp(log_delay), self.max_delay)
        return min(self.base_delay * self.multiplier**exponent, self.max_delay)

    def compute_delay(
        self,
        attempt: int,
        retry_after: float | None = None,
        *,
        rng: random.Random | None = None,
    ) -> float | None:
        """
        How long to wait after failed attempt ``attempt`` (1-based) before the next one.

        Pure and deterministic when ``jitter`` is false.

        Args:
            attempt: the failed attempt's number, from 1.
            retry_after: the provider's hint in seconds: the wait is then
                ``max(jittered backoff, retry_after)``.
            rng: for the jitter of the backoff (see `backoff`), applied when ``jitter`` is
                true (default: the policy's).

        Returns:
            The wait in seconds, or ``None`` when the hint exceeds `retry_after_limit`: the
            provider wants more time than this policy allows, so the caller should not wait
            on this route.
        """
        delay = self.backoff(attempt)
        if self.jitter and delay > 0.0:
            source = self.rng if rng is None else rng
            low = delay / 2.0 if self.jitter_mode == "equal" else 0.0
            delay = source.uniform(low, delay)
        if retry_after is not None:
            retry_after = check(_retry_after_arg, "retry_after", retry_after)
            if retry_after > self.retry_after_limit:
                return None
            delay = max(delay, float(retry_after))
        return delay

    def delays(self, *, rng: random.Random | None = None) -> tuple[float, ...]:
        """
        The waits between the attempts of one route, without any ``Retry-After``.

        ``max_attempts - 1`` values: with the defaults and ``jitter=False``,
        ``(1.0, 2.0)``.
        """
        out: list[float] = []
        for attempt in range(1, self.max_attempts):
            delay = self.compute_delay(attempt, rng=rng)
            assert delay is not None  # no retry_after given
            out.append(delay)
        return tuple(out)

    def is_retryable(self, exc: BaseException) -> bool:
        """
        True when ``exc`` is worth another call to the same route.

        Matches ``retry_on`` by exception class, then by outcome class.  Requests the
        provider rejected as invalid (`Outcome.IGNORED`: 400, context window, content
        policy), cancellations and attempts that failed before sending
        (`Outcome.NOT_SENT`: no API key, configuration) are never retryable, nor is an
        error the provider said a retry cannot mend (``x-should-retry: false``,
        `ProviderError.should_retry`), as the official SDKs obey it: the executor falls
        back to the next route at once.  A provider's ``x-should-retry: true`` does not
        widen ``retry_on`` (the defaults cover every status it comes with: 408, 409, 429,
        5xx).
        """
        outcome = classify_error(exc)
        if outcome in (Outcome.IGNORED, Outcome.CANCELLED, Outcome.NOT_SENT):
            return False
        if isinstance(exc, ProviderError) and exc.should_retry is False:
            return False  # the provider's x-should-retry: false
        for item in self.retry_on:
            if isinstance(item, Outcome):
                if item is outcome:
                    return True
            elif isinstance(exc, item):
                return True
        return False

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """True when ``attempt`` (1-based) is not the last allowed and ``exc`` is retryable."""
        return attempt < self.max_attempts and self.is_retryable(exc)
