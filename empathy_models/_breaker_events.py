"""
What a `CircuitBreaker` tells its listeners: `BreakerEvent` (a state change, a
rejection, the store failing or recovering) and the listener list that delivers them.
"""

from __future__ import annotations

import enum
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import TypeAlias

from attrs import frozen

from .exceptions import ConfigurationError
from .records import CircuitState

__all__ = ["BreakerEvent", "BreakerEventKind", "BreakerListener"]

logger = logging.getLogger("empathy_models.breaker")


class BreakerEventKind(enum.StrEnum):
    """What a `BreakerEvent` reports."""

    STATE_CHANGED = "state_changed"
    """This process saw the key's state change (a trip, a recovery, a reset, a force)."""
    CALL_REJECTED = "call_rejected"
    """A call was rejected (only with ``rejection_events=True``)."""
    STORE_DEGRADED = "store_degraded"
    """The store failed; the breaker runs on its per-process fallback."""
    STORE_RECOVERED = "store_recovered"
    """The store answers again; its state is adopted."""


@frozen(kw_only=True)
class BreakerEvent:
    """
    One thing that happened to a breaker, as passed to listeners.

    ``key`` is the circuit concerned (for store events, the key whose operation noticed
    the outage or the recovery).  ``old_state`` / ``new_state`` are set for
    ``state_changed`` (``old_state`` is the state this process last saw, CLOSED for a
    key it never saw) and ``new_state`` for ``call_rejected``; ``generation`` and
    ``open_until`` describe the new state; ``reason`` says why (the machine's reason,
    such as ``"5 consecutive failures"``); ``error`` describes the store error of a
    ``store_degraded`` event (class and message, no credentials).
    """

    kind: BreakerEventKind
    key: str | None = None
    old_state: CircuitState | None = None
    new_state: CircuitState | None = None
    reason: str | None = None
    generation: int | None = None
    open_until: datetime | None = None
    error: str | None = None
    at: datetime


BreakerListener: TypeAlias = Callable[[BreakerEvent], Awaitable[None] | None]
"""A listener: a function or coroutine function taking one `BreakerEvent`."""


class Listeners:
    """
    The listeners of one breaker.  A listener that raises is logged and the others
    still hear the event; an empty list costs one truth test (``if listeners:``).
    """

    __slots__ = ("_items",)

    def __init__(self, listeners: Iterable[BreakerListener] = ()) -> None:
        self._items: list[BreakerListener] = []
        for listener in listeners:
            self.add(listener)

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, listener: BreakerListener) -> None:
        if not callable(listener):
            raise ConfigurationError(f"a listener must be callable, got {listener!r}")
        self._items.append(listener)

    def discard(self, listener: BreakerListener) -> None:
        if listener in self._items:
            self._items.remove(listener)

    async def emit(self, event: BreakerEvent) -> None:
        for listener in tuple(self._items):
            try:
                result = listener(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception(
                    "circuit breaker listener %r failed on %s for %r",
                    listener,
                    event.kind.value,
                    event.key,
                )
