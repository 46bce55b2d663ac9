"""
From an exception (or its absence) to an `Outcome` class: the one mapping the breaker,
the router and the telemetry all agree on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Final

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


_TELLING: Final[tuple[Outcome, ...]] = (
    Outcome.FATAL,
    Outcome.FAILURE,
    Outcome.RATE_LIMITED,
    Outcome.SUCCESS,
    Outcome.IGNORED,
    Outcome.NOT_SENT,
    Outcome.REJECTED,
    Outcome.CANCELLED,
    Outcome.CACHE_HIT,
)
"""The outcome classes from the most telling down: a group takes its leaves' first."""


def classify_error(exc: BaseException, override: OutcomeClassifier | None = None) -> Outcome:
    """
    Return the outcome class of a call that raised ``exc``.

    ``override`` is consulted first; when it returns ``None`` the defaults apply:
    cancellation -> ``cancelled``; `CircuitOpenError` -> ``rejected``; a
    `ConfigurationError` (such as `MissingAPIKeyError`) or `NotOpenError` (a provider
    without an open session): the request was never sent -> ``not_sent``; 429 ->
    ``rate_limited``; 401/403/404/410 -> ``fatal``; 400, context window and content policy
    -> ``ignored``; timeouts, connection errors, 5xx, overload, invalid responses and
    anything else -> ``failure``.

    An exception group (from an `asyncio.TaskGroup` or an anyio task group) is classed
    by its leaves, each classed as above (``override`` first), nested groups included:
    ``fatal`` if any leaf is, else ``failure`` if any leaf is, else ``rate_limited``,
    then ``success``, ``ignored``, ``not_sent``, ``rejected``, ``cancelled``.  A leaf
    that is an interrupt rather than an exception (`KeyboardInterrupt`, `SystemExit`)
    counts as ``cancelled`` there.
    """
    if override is not None:
        decided = override(exc)
        if decided is not None:
            return decided
    if isinstance(exc, BaseExceptionGroup):
        return _group_class(exc, override)[0]
    return _default_class(exc)


def _default_class(exc: BaseException) -> Outcome:
    """The default outcome class of one exception that is not a group."""
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


def retry_after_of(exc: BaseException, override: OutcomeClassifier | None = None) -> float | None:
    """
    The ``retry_after`` an error carries (provider hint or breaker wait), if any.  For an
    exception group: the longest of the leaves that decide its class (`classify_error`
    with ``override``), so a group classed ``rate_limited`` says its longest Retry-After.
    """
    if isinstance(exc, BaseExceptionGroup):
        return _group_class(exc, override)[1]
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _leaf_classes(
    group: BaseExceptionGroup[BaseException], override: OutcomeClassifier | None
) -> Iterator[tuple[Outcome, BaseException]]:
    """Each leaf of ``group`` (nested groups opened unless ``override`` classes them)."""
    for exc in group.exceptions:
        decided = None if override is None else override(exc)
        if decided is not None:
            yield decided, exc
        elif isinstance(exc, BaseExceptionGroup):
            yield from _leaf_classes(exc, override)
        else:
            outcome = _default_class(exc)
            if outcome is Outcome.FAILURE and not isinstance(exc, Exception):
                outcome = Outcome.CANCELLED  # an interrupt, not the provider's failure
            yield outcome, exc


def _group_class(
    group: BaseExceptionGroup[BaseException], override: OutcomeClassifier | None
) -> tuple[Outcome, float | None]:
    """The most telling class of ``group``'s leaves, and the longest hint among them."""
    leaves = list(_leaf_classes(group, override))
    outcome = min((o for o, _ in leaves), key=_TELLING.index)
    hints = [
        hint
        for o, leaf in leaves
        if o is outcome and (hint := retry_after_of(leaf, override)) is not None
    ]
    return outcome, max(hints, default=None)
