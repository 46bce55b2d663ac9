"""
Budget settlements and rate-limit over-counts a shared quota store failed, sent again
until they land.

A settlement the store failed (it was down, or its answer was lost on the way) is sent
again in the background, after `FIRST_RETRY` seconds doubling up to `MAX_RETRY`, each
try waited for at most the store's timeout.  It names its hold (``hold_id``, see
`QuotaStore.hold_ids`), so a settlement that had landed although its caller saw an
error is not counted twice.  The tries stop once the call's hold has lapsed in the
store (the store released it, and the call's cost would be counted nowhere) or the
limiter has closed: the limiter's close tries each again at once, then at most every
`CLOSING_RETRY` seconds, within its close's time (the executor's `CLOSE_WAIT`).  A
settlement that never landed is counted in ``unsettled`` / ``unsettled_usd`` and logged
once, a warning.  On a store without hold ids a failed settlement is counted so at once:
sent again, one that had landed would count twice.

An `Adjustment`, the tokens a call used beyond its estimate added to a rate-limit
schedule, is sent again the same way, for `ADJUSTMENT_KEPT` seconds at most (a
per-minute limit has forgotten the tokens by then).  It names nothing: one whose answer
was lost after it landed is counted twice, which holds the schedule's next calls back by
as many tokens once, where losing it would let them past the limit by as many.  One that
never landed is counted in ``unadjusted`` / ``unadjusted_tokens`` and logged once, a
warning.  Tokens a call did not use, given back, are not sent again: a give-back lost
leaves capacity unused for a while, never lets a call past the limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, Final

from ..abc import QuotaStore
from ..exceptions import BackendClosedError, BackendError

__all__ = [
    "ADJUSTMENT_KEPT",
    "CLOSING_RETRY",
    "FIRST_RETRY",
    "MAX_RETRY",
    "Adjustment",
    "Resettler",
    "Settlement",
]

logger = logging.getLogger("empathy_models.limits")

FIRST_RETRY: Final = 0.5
"""Seconds from a failed settlement to its first retry."""

MAX_RETRY: Final = 30.0
"""The longest wait between two tries of a settlement (the wait doubles up to it)."""

CLOSING_RETRY: Final = 0.5
"""The longest wait between two tries once the limiter is closing."""

ADJUSTMENT_KEPT: Final = 60.0
"""Seconds a failed over-count of a rate-limit schedule is sent again for (by the store's
clock, from the failure): a per-minute limit has forgotten the call's tokens by then."""


class Settlement:
    """One budget's settlement of one call: where, what, and the hold it names."""

    too_late: Final = "its hold lapsed first"  # why a retry stops at ``lapses_at``

    __slots__ = ("actual", "held", "hold_id", "key", "lapses_at", "store", "we", "ws")

    def __init__(
        self,
        store: QuotaStore,
        key: str,
        window: tuple[float, float],
        amounts: tuple[int, int],
        lapses_at: float,
        hold_id: str | None,
    ) -> None:
        self.store, self.key = store, key
        self.ws, self.we = window
        self.held, self.actual = amounts
        self.lapses_at = lapses_at  # by the store's clock
        self.hold_id = hold_id

    @property
    def what(self) -> str:
        return f"settling budget {self.key}"

    def unsendable(self) -> str | None:
        """Why it cannot be sent again (None: it can)."""
        if self.hold_id is None or not self.store.hold_ids:
            return "the quota store cannot tell a settlement sent twice"
        return None

    async def send(self, resent: bool = False) -> None:
        """The settlement, once (`QuotaStore.settle`); ``resent``: sent before."""
        named: dict[str, Any] = {}
        if self.hold_id is not None:
            named = (
                {"hold_id": self.hold_id, "resent": True} if resent else {"hold_id": self.hold_id}
            )
        await self.store.settle(
            self.key,
            window_start=self.ws,
            window_end=self.we,
            held=self.held,
            actual=self.actual,
            lapses_at=self.lapses_at,
            **named,
        )


class Adjustment:
    """
    One rate-limit schedule's over-count of one call: ``delta`` seconds, the ``tokens``
    it used beyond its estimate, added to ``key``'s schedule (`QuotaStore.adjust`).
    """

    __slots__ = ("delta", "key", "lapses_at", "store", "tokens")

    too_late: Final = f"{ADJUSTMENT_KEPT:g} s passed first"  # why a retry stops at ``lapses_at``

    def __init__(
        self, store: QuotaStore, key: str, delta: float, tokens: int, lapses_at: float
    ) -> None:
        self.store, self.key = store, key
        self.delta, self.tokens = delta, tokens
        self.lapses_at = lapses_at  # by the store's clock: sent again until then

    @property
    def what(self) -> str:
        return f"adjusting rate limit {self.key}"

    def unsendable(self) -> str | None:
        """Why it cannot be sent again: never (sent twice, it holds calls back, see above)."""
        return None

    async def send(self, resent: bool = False) -> None:
        """The adjustment, once (`QuotaStore.adjust`)."""
        await self.store.adjust(self.key, delta=self.delta)


Pending = Settlement | Adjustment
"""A store operation `Resettler` sends again."""


class Resettler:
    """
    The failed settlements and over-counts of one limiter, retried (`retry`) until they
    land, their holds lapse (an over-count: `ADJUSTMENT_KEPT` has passed), or the
    limiter closes (`close`, then `abandon`).

    Args:
        failed: told of each store failure (the limiter's degraded mode).
        timeout: seconds one try may take (None: no limit).
        store_now: the store's clock as the limiter estimates it (UTC epoch seconds).
    """

    __slots__ = (
        "_failed",
        "_store_now",
        "_timeout",
        "closing",
        "tasks",
        "unadjusted",
        "unadjusted_tokens",
        "unsettled",
        "unsettled_nano",
    )

    def __init__(
        self,
        failed: Callable[[BaseException], None],
        timeout: float | None,
        store_now: Callable[[], float],
    ) -> None:
        self._failed, self._timeout, self._store_now = failed, timeout, store_now
        self.closing = asyncio.Event()
        # the retries running, each with what it sends
        self.tasks: dict[asyncio.Task[None], Pending] = {}
        self.unsettled = 0  # settlements that never landed
        self.unsettled_nano = 0  # what those calls cost
        self.unadjusted = 0  # over-counts that never landed
        self.unadjusted_tokens = 0  # the tokens they would have added

    def retry(self, pending: Pending, why: BaseException) -> asyncio.Task[None] | None:
        """
        ``pending``, which its store failed with ``why``, sent again in a task of its
        own (returned; None when it cannot be: counted as lost at once).
        """
        unsendable = pending.unsendable()
        if unsendable is not None:
            self._lost(pending, unsendable)
            return None
        if self.closing.is_set():
            self._lost(pending, "the limiter has closed")
            return None
        logger.debug("%s failed (%r): retrying", pending.what, why)
        task = asyncio.get_running_loop().create_task(self._retried(pending))
        self.tasks[task] = pending
        task.add_done_callback(self._ended)
        return task

    @staticmethod
    def _ended(task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            task.exception()  # nobody awaits it

    async def _retried(self, pending: Pending) -> None:
        delay, tries = FIRST_RETRY, 0
        task = asyncio.current_task()
        try:
            while True:
                await self._pause(delay)
                delay = min(delay * 2, MAX_RETRY)
                if self._store_now() >= pending.lapses_at:
                    self._lost(pending, pending.too_late)
                    return
                tries += 1
                try:
                    async with asyncio.timeout(self._timeout):
                        await pending.send(resent=True)
                except BackendClosedError:
                    self._lost(pending, "the quota store was closed")
                    return
                except (BackendError, TimeoutError) as exc:
                    self._failed(exc)
                    continue
                except Exception as exc:  # nobody awaits this task: say what went wrong
                    self._lost(pending, f"sending it again raised {exc!r}")
                    return
                logger.info("%s: landed at its retry %d", pending.what, tries)
                return
        except asyncio.CancelledError:
            if task in self.tasks:  # not abandoned, which counted it
                self._lost(pending, "its retry was cancelled")
            raise
        finally:
            self.tasks.pop(task, None)  # type: ignore[arg-type]

    async def _pause(self, delay: float) -> None:
        """``delay`` seconds, cut short when the limiter starts closing (then at most
        `CLOSING_RETRY`)."""
        if self.closing.is_set():
            await asyncio.sleep(min(delay, CLOSING_RETRY))
            return
        try:
            async with asyncio.timeout(delay):
                await self.closing.wait()
        except TimeoutError:
            pass

    def close(self) -> None:
        """The limiter is closing: every retry tries at once, then more often."""
        self.closing.set()

    def abandon(self) -> None:
        """The retries still running stop, what they send counted as lost."""
        for task, pending in list(self.tasks.items()):
            del self.tasks[task]
            self._lost(pending, "the limiter closed first")
            task.cancel()

    def _lost(self, pending: Pending, why: str) -> None:
        if isinstance(pending, Adjustment):
            self.unadjusted += 1
            self.unadjusted_tokens += pending.tokens
            logger.warning(
                "adjusting rate limit %s failed and %s: the %d tokens the call used beyond "
                "its estimate are not counted in the quota store's schedule (the calls "
                "after it may go past the limit by as many)",
                pending.key,
                why,
                pending.tokens,
            )
            return
        self.unsettled += 1
        self.unsettled_nano += pending.actual
        logger.warning(
            "settling budget %s failed and %s: the $%.6f the call cost is not counted in "
            "the quota store (its hold of $%.6f %s at %s)",
            pending.key,
            why,
            pending.actual / 1e9,
            pending.held / 1e9,
            "lapsed" if self._store_now() >= pending.lapses_at else "lapses",
            time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(pending.lapses_at)),
        )
