"""
Admissions whose caller gave up waiting: no probe lease stranded by a late script run.

An admission's script may run although its caller no longer waits for the answer: the
command was written, then the socket timeout passed or the caller was cancelled (a
breaker's ``store_timeout``), and Redis ran it when the stall ended or the command
arrived.  A HALF_OPEN probe lease it took would be held for ``probe_lease_seconds``, as
if a prober had crashed, and no other worker could probe until then.  So:

* every admission carries a deadline by Redis's clock (`LateAdmissions.deadline`): the
  time the store stops waiting for its answer (the connection's socket timeout after
  the command was packed), estimated from the ``TIME`` the last reply carried, always
  early rather than late.  The script grants no lease after it;
* an admission given up after its command was written (`was_sent`) gives its lease back
  by its id once that deadline has passed by Redis's clock (`LateAdmissions.give_back`):
  by then the script has either run, taking the lease the give-back returns, or will
  take none.  Doing it sooner could reach Redis before the admission itself, on another
  connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Final

__all__ = ["UNBOUNDED_WAIT", "LateAdmissions", "sent", "was_sent"]

logger = logging.getLogger("empathy_models.backends.redis")

UNBOUNDED_WAIT: Final = 5.0
"""Seconds an admission may take to reach the script when the client has no socket
timeout (it would wait for ever; a breaker's ``store_timeout`` is 5 s by default)."""

_SENT: Final = "_empathy_sent"


def sent(exc: BaseException) -> BaseException:
    """Mark ``exc`` as raised after its command was written (Redis may run it)."""
    setattr(exc, _SENT, True)
    return exc


def was_sent(exc: BaseException) -> bool:
    """Whether ``exc`` (or the error it wraps) was raised after its command was written."""
    return bool(getattr(exc, _SENT, False) or getattr(exc.__cause__, _SENT, False))


class LateAdmissions:
    """
    One store's admission deadlines and the give-backs of leases they may have taken.

    Args:
        wait: seconds the store waits for a script's answer (its socket timeout), or
            ``None`` for no limit (`UNBOUNDED_WAIT` is used).
    """

    __slots__ = ("_pending", "offset", "wait")

    def __init__(self, wait: float | None) -> None:
        self.wait = UNBOUNDED_WAIT if wait is None else float(wait)
        self.offset: float | None = None
        """Redis's ``TIME`` minus ``time.monotonic()``, as of the last reply (a lower
        bound: the reply left Redis before it was read)."""
        self._pending: set[asyncio.Task[None]] = set()

    def seen(self, server_time: float) -> None:
        """A reply carried Redis's ``TIME``."""
        self.offset = server_time - time.monotonic()

    def deadline(self) -> tuple[str, float]:
        """
        The deadline an admission packed now carries (Redis's clock in whole
        milliseconds, rounded down, as the script reads it) and the ``time.monotonic()``
        by which it has passed there.  Before any reply, this host's clock stands in
        for Redis's.
        """
        now = time.monotonic()
        offset = self.offset
        if offset is None:
            offset = time.time() - now
        return str(int((now + offset + self.wait) * 1000)), now + self.wait

    def give_back(
        self, release: Callable[[], Coroutine[Any, Any, object]], passed_at: float
    ) -> None:
        """
        ``await release()`` (the lease given back by its id) in a task of its own, once
        ``time.monotonic()`` is past ``passed_at`` (see `deadline`) by as much again, a
        margin for the two clocks; once, its failure logged (the lease then expires on
        its own).
        """
        task = asyncio.get_running_loop().create_task(self._later(release, passed_at))
        self._pending.add(task)
        task.add_done_callback(self._ended)

    async def _later(
        self, release: Callable[[], Coroutine[Any, Any, object]], passed_at: float
    ) -> None:
        await asyncio.sleep(max(0.0, passed_at - time.monotonic()) + self.wait)
        try:
            await release()
        except Exception as exc:  # nobody awaits this: the lease expires on its own
            logger.debug("giving back the lease of an admission given up on failed: %r", exc)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._pending.discard(task)
        if not task.cancelled():
            task.exception()  # logged in _later; nothing else is raised there

    def cancel(self) -> None:
        """The store closes: give-backs not sent yet are dropped (those leases expire)."""
        for task in self._pending:
            task.cancel()
        self._pending.clear()
