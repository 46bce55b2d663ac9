"""
From an exception (or its absence) to an `Outcome` class: the one mapping the breaker,
the router and the telemetry all agree on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .exceptions import (
    AuthenticationError,
    CircuitOpenError,
    ConfigurationError,
    InvalidRequestError,
    ModelNotFoundError,
    NotOpenError,
    RateLimitedError,
)
from .records import Outcome

__all__ = ["OutcomeClassifier", "classify_error", "retry_after_of"]

OutcomeClassifier = Callable[[BaseException], Outcome | None]
"""A user predicate: return an `Outcome` to override the default class, or ``None``."""


def classify_error(exc: BaseException, override: OutcomeClassifier | None = None) -> Outcome:
    """
    Return the outcome class of a call that raised ``exc``.

    ``override`` is consulted first; when it returns ``None`` the defaults apply:
    cancellation -> ``cancelled``; `CircuitOpenError` -> ``rejected``; a
    `ConfigurationError` (such as `MissingAPIKeyError`) or `NotOpenError` (a provider
    without an open session): the request was never sent -> ``not_sent``; 429 ->
    ``rate_limited``; 401/403/404 -> ``fatal``; 400, context window and content policy
    -> ``ignored``; timeouts, connection errors, 5xx, overload, invalid responses and
    anything else -> ``failure``.
    """
    if override is not None:
        decided = override(exc)
        if decided is not None:
            return decided
    if isinstance(exc, asyncio.CancelledError):
        return Outcome.CANCELLED
    if isinstance(exc, CircuitOpenError):
        return Outcome.REJECTED
    if isinstance(exc, ConfigurationError | NotOpenError):
        return Outcome.NOT_SENT
    if isinstance(exc, RateLimitedError):
        return Outcome.RATE_LIMITED
    if isinstance(exc, AuthenticationError | ModelNotFoundError):
        return Outcome.FATAL
    if isinstance(exc, InvalidRequestError):
        return Outcome.IGNORED
    return Outcome.FAILURE


def retry_after_of(exc: BaseException) -> float | None:
    """The ``retry_after`` an error carries (provider hint or breaker wait), if any."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None
