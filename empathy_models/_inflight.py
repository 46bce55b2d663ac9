"""
The executor's runs and streams in flight, so that `EmpathyLLMExecutor.aclose` can end
them before it closes what they use.

`aclose` cancels each run (and each stream being opened or read) in the task running
it, with a cancellation that the run itself turns into `NotOpenError` (as
``asyncio.timeout`` turns its own into `TimeoutError`): the attempt in progress is
recorded as cancelled, its breaker lease is given back and its budget reservation
settled (given back when its call was not sent, else charged what the call may have
cost), and its record is written, all while the stores are still open.  A run whose
answer came already (`Tracked.answered`) is not cancelled: it finishes its bookkeeping and returns
the answer its record counts as a success.  A stream entered but not being
read is closed by `aclose` itself; its next read raises the same error.  `aclose` waits
for that bookkeeping (and the store operations left in flight) for at most `CLOSE_WAIT`
seconds in all, then closes the stores anyway.

Tracking costs a set insertion and removal per run and an attribute per stream read.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable
from types import TracebackType
from typing import Any, Final, Protocol

from .exceptions import NotOpenError

__all__: list[str] = []

logger = logging.getLogger("empathy_models.executor")

CLOSE_WAIT: Final = 10.0
"""
How long `EmpathyLLMExecutor.aclose` waits, in all, for the runs and streams it ended
and for the store operations still in flight, before it closes the stores.
"""


def closed_error(what: str) -> NotOpenError:
    """The error a run or stream ended by `EmpathyLLMExecutor.aclose` raises."""
    return NotOpenError(
        f"the EmpathyLLMExecutor was closed (aclose()) while this {what} was in flight; "
        "its attempt in progress is recorded as cancelled"
    )


class Abort:
    """
    A cancellation sent to ``task`` by `InFlight.end`, told apart from any other by the
    task's cancellation count (as ``asyncio.timeout`` does).
    """

    __slots__ = ("cancelling", "sent", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.cancelling = task.cancelling()
        self.sent = False

    def send(self) -> None:
        self.sent = True
        self.task.cancel("the EmpathyLLMExecutor is closing")

    def taken(self) -> bool:
        """
        Take the cancellation back, once it has been delivered (or swallowed): True when
        it was the only one (nobody else cancelled the task meanwhile), so the closed
        error is raised instead; False when none was sent or another cancellation
        stands (which is raised as is).
        """
        if not self.sent:
            return False
        self.sent = False
        return self.task.uncancel() <= self.cancelling


class Tracked(Abort):
    """
    One run, or a stream's opening, while in flight: ``with inflight.track("run") as
    tracked:`` around its body.  Leaving the block with the cancellation `InFlight.end`
    sent raises the closed error instead.  Once its answer is in (recorded a success),
    the run sets ``answered``: `InFlight.end` then waits for its bookkeeping without
    cancelling it, and the run returns its answer.
    """

    __slots__ = ("answered", "inflight", "what")

    def __init__(self, inflight: InFlight, task: asyncio.Task[object], what: str) -> None:
        self.task = task  # `Abort.__init__`, inlined: this is every run's path
        self.cancelling = task.cancelling()
        self.sent = False
        self.inflight = inflight
        self.what = what
        self.answered = False

    def __enter__(self) -> Tracked:
        self.inflight.runs.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        inflight = self.inflight
        inflight.runs.discard(self)
        if inflight.idle is not None:
            inflight.check_idle()
        # a run that ended anyway (a cancellation swallowed on its way) keeps its result
        if self.taken() and exc_type is not None and issubclass(exc_type, asyncio.CancelledError):
            raise closed_error(self.what) from None


class _Untracked:
    """`InFlight.track` outside a task (nothing can end it): a no-op."""

    __slots__ = ()

    def __enter__(self) -> _Untracked:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass

    @property
    def answered(self) -> bool:
        return False

    @answered.setter
    def answered(self, value: bool) -> None:
        """Nothing ends such a call: an answer changes nothing."""


UNTRACKED: Final = _Untracked()


class Ending(Protocol):
    """What `InFlight.end` asks of an open stream (`empathy_models.streaming.LLMStream`)."""

    def _end_for_close(self) -> Awaitable[None] | None:
        """
        End the stream: cancel the task reading it (None), or, when nobody is reading
        it, the closing to await.  None as well for a stream already ending.
        """


class InFlight:
    """
    The executor's runs (``runs``: `Tracked`) and the streams holding a provider slot
    (``streams``, from their first delta until their attempt is reported; held weakly,
    so a stream dropped without being closed is collected, and its finalizer closes it).
    ``flights``: per response-cache key, the run asking a model for that request, which
    the runs of the same request wait for (`empathy_models._cached.follow`).
    """

    __slots__ = ("closing", "flights", "idle", "over", "runs", "streams")

    def __init__(self) -> None:
        self.runs: set[Tracked] = set()
        self.streams: weakref.WeakSet[Ending] = weakref.WeakSet()
        self.idle: asyncio.Event | None = None  # while `end` waits
        self.closing: set[asyncio.Future[None]] = set()  # streams `end` closes itself
        # the executor's close (`aclose`), done once it has closed everything: a later
        # `aclose` waits for it
        self.over: asyncio.Future[None] | None = None
        self.flights: dict[str, Any] = {}

    def track(self, what: str) -> Tracked | _Untracked:
        """A context manager around a run's (or a stream opening's) body."""
        task = asyncio.current_task()
        if task is None:
            return UNTRACKED
        return Tracked(self, task, what)

    def ended(self, stream: Ending) -> None:
        """``stream`` gave back its slot and hold: its attempt is reported."""
        self.streams.discard(stream)
        if self.idle is not None:
            self.check_idle()

    def check_idle(self) -> None:
        assert self.idle is not None
        if not self.runs and not self.streams:
            self.idle.set()

    async def end(self, seconds: float = CLOSE_WAIT) -> None:
        """
        Cancel every run and stream in flight (but those of the calling task) and wait,
        at most ``seconds``, until each has done its bookkeeping.
        """
        current = asyncio.current_task()
        for run in [run for run in self.runs if run.task is current]:
            self.runs.discard(run)  # it called aclose: it cannot be waited for
        for run in self.runs:
            if not run.answered:  # an answered run only has its bookkeeping left
                run.send()
        for stream in list(self.streams):
            ending = stream._end_for_close()
            if ending is not None:
                closed = asyncio.ensure_future(ending)
                self.closing.add(closed)
                closed.add_done_callback(self._closed)
        if not self.runs and not self.streams:
            return
        self.idle = idle = asyncio.Event()
        try:
            await asyncio.wait_for(idle.wait(), max(seconds, 0.0))
        except TimeoutError:
            logger.warning(
                "aclose(): %d run(s) and %d stream(s) still in flight after %.0f s; closing "
                "the executor's resources under them",
                len(self.runs),
                len(self.streams),
                seconds,
            )
        finally:
            self.idle = None

    def _closed(self, closed: asyncio.Future[None]) -> None:
        self.closing.discard(closed)
        if not closed.cancelled() and closed.exception() is not None:
            logger.error("closing a stream in flight failed", exc_info=closed.exception())
