"""
What a `CircuitBreaker` tells its listeners: `BreakerEvent` (a state change, a
rejection, the store failing or recovering) and the listener list that delivers them.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import TypeAlias

from attrs import frozen

from ._urls import masked_keys, masked_urls
from ._validators import escaped, shown as shown_value
from .circuit import shown
from .exceptions import ConfigurationError
from .records import CircuitBreakerState, CircuitState, _ts_to_datetime

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

    Every listener hears the events in the order the breaker saw them, even when an
    async listener suspends: the task that emits an event while none is being delivered
    delivers it, then every event emitted meanwhile (by other tasks, which do not wait
    for it, or by a listener itself), each in the context of the task that emitted it
    (a listener reading a context variable, such as the executor's current span, sees
    that task's).  When that task is cancelled in a listener, a task of the breaker's
    delivers the events left.
    """

    __slots__ = ("_delivering", "_drainer", "_items", "_queue")

    def __init__(self, listeners: Iterable[BreakerListener] = ()) -> None:
        self._items: list[BreakerListener] = []
        for listener in listeners:
            self.add(listener)
        self._queue: deque[tuple[BreakerEvent, contextvars.Context]] = deque()
        """Events emitted while others were being delivered, with their tasks' contexts."""
        self._delivering = False
        self._drainer: asyncio.Task[None] | None = None
        """The task delivering what a cancelled delivery left, if any."""

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, listener: BreakerListener) -> None:
        if not callable(listener):
            raise ConfigurationError(f"a listener must be callable, got {shown_value(listener)}")
        self._items.append(listener)

    def discard(self, listener: BreakerListener) -> None:
        if listener in self._items:
            self._items.remove(listener)

    async def emit(self, event: BreakerEvent) -> None:
        if self._delivering:
            # the task delivering the events before it delivers this one after them
            self._queue.append((event, contextvars.copy_context()))
            return
        self._delivering = True
        await self._drain(event)

    async def _drain(self, first: BreakerEvent | None = None) -> None:
        """Deliver ``first``, then the queued events in order (the one task doing so)."""
        queue = self._queue
        try:
            if first is not None:
                await self._deliver(first, None)
            while queue:
                await self._deliver(*queue.popleft())
        finally:
            if queue and asyncio.current_task() is not self._drainer:
                # cut short (cancelled): what is left is delivered by a task of its own
                self._drainer = asyncio.get_running_loop().create_task(self._drain())
            else:  # a cancelled drainer leaves what is left to the next event
                self._delivering = False
                self._drainer = None

    async def _deliver(self, event: BreakerEvent, context: contextvars.Context | None) -> None:
        """``event`` to every listener, in ``context`` (None: this task's own)."""
        for listener in tuple(self._items):
            try:
                result = listener(event) if context is None else context.run(listener, event)
                if inspect.isawaitable(result):
                    if context is not None and inspect.iscoroutine(result):
                        # an async listener's body runs in the emitting task's context too
                        result = asyncio.get_running_loop().create_task(result, context=context)
                    await result
            except Exception:
                logger.exception(
                    "circuit breaker listener %r failed on %s for %s",
                    listener,
                    event.kind.value,
                    shown(event.key),
                )


ts = _ts_to_datetime
"""UTC epoch seconds as an aware datetime (``None`` stays ``None``; beyond year 9999, an
absurd Retry-After or open period, the latest instant a datetime holds)."""


def describe(exc: BaseException) -> str:
    """
    ``exc`` in one line for events, logs and stores: class and message, <= 300 chars,
    API keys (``sk-...``) and the secrets of URLs in it (a password, ``?key=...``) masked:
    a shared store shows it to every worker.
    """
    text = masked_keys(masked_urls(str(exc)))
    described = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    described = escaped(described)  # what some store cannot hold
    return described if len(described) <= 300 else described[:297] + "..."


class Events:
    """
    What one breaker says: a log line per state change it sees, and `BreakerEvent`s
    to its listeners (built only when there is a listener to hear them).

    Args:
        listeners: The listeners to start with.
        clock: UTC epoch seconds, for the events' ``at``.
    """

    __slots__ = ("_clock", "listeners")

    def __init__(self, listeners: Iterable[BreakerListener], clock: Callable[[], float]) -> None:
        self.listeners = Listeners(listeners)
        self._clock = clock

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    async def changed(
        self, state: CircuitBreakerState, old_state: CircuitState, reason: str | None
    ) -> None:
        """This process saw ``state.key`` move from ``old_state`` to ``state``."""
        log_transition(state, old_state, reason)
        if self.listeners:
            await self.listeners.emit(
                BreakerEvent(
                    kind=BreakerEventKind.STATE_CHANGED,
                    key=state.key,
                    old_state=old_state,
                    new_state=state.state,
                    reason=reason,
                    generation=state.generation,
                    open_until=ts(state.open_until_ts),
                    at=self._now(),
                )
            )

    async def rejected(self, state: CircuitBreakerState) -> None:
        """A call for ``state.key`` was rejected in ``state``."""
        if self.listeners:
            await self.listeners.emit(
                BreakerEvent(
                    kind=BreakerEventKind.CALL_REJECTED,
                    key=state.key,
                    new_state=state.state,
                    reason=state.reason,
                    generation=state.generation,
                    open_until=ts(state.open_until_ts),
                    at=self._now(),
                )
            )

    async def store_degraded(self, key: str | None, error: str) -> None:
        """The store failed (for ``key`` alone, or as a whole) with ``error``."""
        if self.listeners:
            await self.listeners.emit(
                BreakerEvent(
                    kind=BreakerEventKind.STORE_DEGRADED, key=key, error=error, at=self._now()
                )
            )

    async def store_recovered(self, key: str | None) -> None:
        """The store answers again (for ``key`` alone, or as a whole)."""
        if self.listeners:
            await self.listeners.emit(
                BreakerEvent(kind=BreakerEventKind.STORE_RECOVERED, key=key, at=self._now())
            )


def log_transition(state: CircuitBreakerState, old: CircuitState, reason: str | None) -> None:
    """One log line per state change this process sees (WARNING when a key opens)."""
    new = state.state
    opened = new is CircuitState.OPEN or new is CircuitState.FORCED_OPEN
    level = logging.WARNING if opened else logging.INFO
    if not logger.isEnabledFor(level):
        return
    if opened:
        until = ts(state.open_until_ts)
        held = "until reset" if until is None else f"until {until.isoformat(timespec='seconds')}"
        logger.log(
            level,
            "circuit %s %s (was %s, generation %d, %s): %s",
            shown(state.key),
            "opened" if new is CircuitState.OPEN else "forced open",
            old.value,
            state.generation,
            held,
            reason or "no reason given",
        )
    else:
        logger.log(
            level,
            "circuit %s %s (was %s, generation %d)%s",
            shown(state.key),
            {"half_open": "half-open", "closed": "closed", "disabled": "disabled"}.get(
                new.value, new.value
            ),
            old.value,
            state.generation,
            f": {reason}" if reason else "",
        )
