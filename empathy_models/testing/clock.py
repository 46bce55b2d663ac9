"""
A clock that moves only when a test says so.

`FakeClock` is a callable returning UTC epoch seconds as a float, the shape every
``clock=`` parameter in this package takes (`MemoryStateStore`, the circuit breaker).
Time stands still until `FakeClock.advance` or `FakeClock.set` moves it, so tests of
recovery times, lease expiry and backoff run instantly and give the same answer every
time::

    clock = FakeClock()
    store = MemoryStateStore(clock=clock)
    ...
    clock.advance(60)  # the breaker's recovery time has now passed
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Final

import anyio.lowlevel

from .._validators import shown
from ..exceptions import ConfigurationError

__all__ = ["DEFAULT_START", "FakeClock"]

DEFAULT_START: Final = 1_767_225_600.0
"""Where a `FakeClock` starts by default: 2026-01-01T00:00:00Z."""


def _check_time(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"FakeClock: {name} must be a finite number, got {shown(value)}")
    return float(value)


class FakeClock:
    """
    A manually driven clock: ``clock()`` returns the current fake UTC epoch seconds.

    It never moves on its own.  `advance` moves it forward (never backward, to model a
    well-behaved clock); `set` puts it anywhere, backward included, to model a wall
    clock being stepped.  `sleep` is an async drop-in for ``anyio.sleep`` that advances
    the clock instead of waiting, for code that takes an injectable sleep.  It is a
    plain object without locks: it is meant for one event loop in one thread.

    Args:
        start: the initial time, UTC epoch seconds.

    Raises:
        ConfigurationError: ``start`` not a finite number.
    """

    __slots__ = ("_now",)

    def __init__(self, start: float = DEFAULT_START) -> None:
        self._now = _check_time("start", start)

    def __call__(self) -> float:
        """Return the current fake time in UTC epoch seconds."""
        return self._now

    def __repr__(self) -> str:
        return f"FakeClock({self._now!r})"

    @property
    def now(self) -> float:
        """The current fake time in UTC epoch seconds (the same as calling the clock)."""
        return self._now

    def as_datetime(self) -> datetime:
        """The current fake time as an aware UTC datetime."""
        return datetime.fromtimestamp(self._now, UTC)

    def advance(self, seconds: float) -> float:
        """
        Move the clock forward by ``seconds`` and return the new time.

        Raises:
            ConfigurationError: a negative or non-finite amount (use `set` to move the clock
                backward on purpose), or one that would take the clock past the largest
                finite float.
        """
        step = _check_time("seconds", seconds)
        if step < 0:
            raise ConfigurationError(
                f"FakeClock.advance: seconds must be >= 0, got {shown(seconds)}; "
                "use set() to move the clock backward"
            )
        if not math.isfinite(self._now + step):
            raise ConfigurationError(
                f"FakeClock.advance: {shown(seconds)} seconds from {self._now!r} is past the "
                "largest time a float holds"
            )
        self._now += step
        return self._now

    def set(self, ts: float) -> None:
        """Put the clock at ``ts`` UTC epoch seconds (backward is allowed)."""
        self._now = _check_time("ts", ts)

    async def sleep(self, seconds: float) -> None:
        """
        Advance the clock by ``seconds`` and yield to the event loop once.

        It takes what ``anyio.sleep`` takes: ``math.inf`` waits until cancelled, the
        clock left where it is (it cannot be put at infinity), as ``anyio.sleep(math.inf)``
        never returns.

        Raises:
            ConfigurationError: a negative amount or NaN, which ``anyio.sleep`` refuses
                too (with `ValueError`, which this error is).
        """
        if seconds == math.inf:
            await anyio.sleep_forever()
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds >= 0:
            raise ConfigurationError(
                f"FakeClock.sleep: seconds must be a number >= 0, got {shown(seconds)}"
            )
        self.advance(seconds)
        await anyio.lowlevel.checkpoint()
