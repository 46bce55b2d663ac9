"""
`StoreClock`: a breaker's estimate of its state store's clock.

A store times its states by its own clock (`CircuitStateStore.now`: the Redis server's
``TIME``, the database's ``clock_timestamp()``, a SQLite or memory store's ``clock``),
and a breaker compares those times (an open period's end, a probe lease's expiry, the
failure window) with now: the store's now, estimated as the breaker's clock plus the
difference last measured between the two.  A measurement is one round trip, its
midpoint taken as the moment the store read its clock (off by at most half the round
trip); it is made when the breaker adopts a state that is not CLOSED or DISABLED (only
those hold times compared with now) and the last one is a minute old, never on the
CLOSED path.  Until the first one, and on a store that does not say (`now` answers
None), the difference is 0: the breaker's clock is taken for the store's, as before.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from .backends._failover import FailoverStateStore

__all__ = ["REMEASURE_SECONDS", "StoreClock"]

logger = logging.getLogger("empathy_models.breaker")

REMEASURE_SECONDS: Final = 60.0
"""How old (by the breaker's clock) a measurement of the store's clock may get."""


class StoreClock:
    """
    The store's clock as a breaker estimates it: ``clock() + offset``.

    Args:
        stores: the breaker's failover decorator over its store: while it answers from
            a per-process fallback (timed by ``clock``), no measurement is taken.
        clock: the breaker's clock (UTC epoch seconds).
    """

    __slots__ = ("_clock", "_stores", "measured_at", "offset")

    def __init__(self, stores: FailoverStateStore, clock: Callable[[], float]) -> None:
        self._stores = stores
        self._clock = clock
        self.offset = 0.0
        """The store's clock minus the breaker's, as last measured (0 until then)."""
        self.measured_at = -math.inf

    def now(self) -> float:
        """The store's now, by the breaker's clock and the last measurement."""
        return self._clock() + self.offset

    def skew(self, key: str) -> float:
        """
        The store's clock minus the breaker's for ``key``: 0 while ``key`` is on a
        per-process fallback (timed by the breaker's clock).
        """
        return self.offset if self._stores.primary_answers(key) else 0.0

    def due(self, now: float) -> bool:
        """Whether a measurement is due at ``now`` (the breaker's clock)."""
        return not self.measured_at <= now < self.measured_at + REMEASURE_SECONDS

    async def measure(self) -> None:
        """
        Measure the store's clock against the breaker's, on one round trip (bounded by
        the store's timeout).  A failure keeps the last estimate (logged at DEBUG, and
        tried again a minute later); so does an answer from the per-process fallback.
        """
        stores = self._stores
        before = self._clock()
        self.measured_at = before  # one attempt a minute, even while the store fails
        try:
            told = await stores.now()
        except Exception as exc:  # a failed measurement must not fail a call
            logger.debug("circuit breaker: reading the store's clock failed: %r", exc)
            return
        after = self._clock()
        if stores.degraded:
            return  # the fallback's clock is the breaker's: nothing learned
        self.offset = 0.0 if told is None else told - (before + after) / 2
