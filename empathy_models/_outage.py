"""
`Outage`: the degraded mode of a shared store the executor can do without for a while
(the limiter's quota store, the response cache).

After a store operation fails (or does not answer in time), the store is left alone for
``retry_interval`` seconds: one warning per outage, counted in ``events``; every failure
counted in ``errors``.  The first use after the interval tries the store again.  The
breaker's own degraded mode is `empathy_models.backends._failover.FailoverStateStore`,
which also has a fallback state to seed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["STORE_TIMEOUT", "Outage"]

STORE_TIMEOUT = 5.0
"""How long one operation of such a store may take before it counts as a failure (the
breaker's default ``store_timeout`` too)."""


class Outage:
    """
    Whether ``store`` is to be left alone now, after a failure.

    Args:
        logger: where the warning of an outage and the retry are logged.
        what: the store, as the log names it (``"quota store 'redis://…'"``).
        meanwhile: what is done instead while it is down, for the warning
            (``"budgets and rate limits are kept per process"``).
        retry_interval: seconds the store is left alone after a failure.
        monotonic: monotonic seconds.
    """

    __slots__ = (
        "_logger",
        "_mono",
        "_until",
        "errors",
        "events",
        "meanwhile",
        "retry_interval",
        "what",
    )

    def __init__(
        self,
        logger: logging.Logger,
        what: str,
        meanwhile: str,
        *,
        retry_interval: float = 5.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self.what = what
        self.meanwhile = meanwhile
        self.retry_interval = retry_interval
        self._mono = monotonic
        self._until: float | None = None
        self.events = 0
        """Outages (one per outage, logged once)."""
        self.errors = 0
        """Operations that failed or did not answer in time."""

    @property
    def down(self) -> bool:
        """True while the store is left alone after a failure."""
        return self._until is not None and self._mono() < self._until

    def skip(self) -> bool:
        """
        Whether to leave the store alone now (it failed less than ``retry_interval``
        seconds ago); after that, False once with the retry logged.
        """
        until = self._until
        if until is None:
            return False
        if self._mono() < until:
            return True
        self._until = None
        self._logger.info("trying the %s again", self.what)
        return False

    def failed(self, exc: BaseException) -> None:
        """An operation of the store failed with ``exc``: down for ``retry_interval``."""
        self.errors += 1
        if self._until is None:
            self.events += 1
            self._logger.warning(
                "%s failed (%s: %s); %s for %.0f s",
                self.what,
                type(exc).__name__,
                str(exc)[:200] or "no answer in time",
                self.meanwhile,
                self.retry_interval,
            )
        self._until = self._mono() + self.retry_interval
