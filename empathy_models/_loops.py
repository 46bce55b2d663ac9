"""
Objects bound to the event loop they were opened in: the check, and closing from another.

An object opened in one event loop (its tasks, locks, sockets) can only be used in that
loop.  `elsewhere` is the check; `close_at_home` runs a close in the loop it belongs to
when that loop still runs (in another thread); otherwise what is bound to it is dropped
and `dropped` says so in one warning.  `submit` hands a coroutine to another thread's
loop (`close_at_home`, `SyncExecutor`'s calls) so that however it ends, after its
caller gave up on it or not, the end is taken and an error is never left unretrieved.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from .exceptions import NotOpenError

T = TypeVar("T")

logger = logging.getLogger("empathy_models.loops")

# the running event loop, or None (``asyncio.get_running_loop`` without the exception)
running_loop = asyncio._get_running_loop


def elsewhere(loop: asyncio.AbstractEventLoop | None) -> bool:
    """Whether ``loop`` (the one an object was opened in) is not the running one."""
    return loop is not None and loop is not running_loop()


def other_loop_error(what: str) -> NotOpenError:
    """The error of an object used from another event loop than the one it was opened in."""
    return NotOpenError(
        f"{what} was opened in another event loop and can only be used in that one (its "
        "tasks and connections are bound to it): open one per event loop, e.g. inside each "
        "asyncio.run()"
    )


def submit(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], what: str, log: logging.Logger
) -> concurrent.futures.Future[T]:
    """
    Run ``coro`` as a task of ``loop`` (running in another thread), as
    `asyncio.run_coroutine_threadsafe` does, with every end of it taken.  Cancelling the
    returned future cancels the task, or, before ``loop`` has started it (a loop that
    stopped meanwhile never will), closes the coroutine there and then.  A task
    that fails after its future was cancelled, its caller no longer waiting (it gave
    up, or was interrupted), has its error logged to ``log`` as ``what`` failing: it is
    never left to the loop's "Task exception was never retrieved".

    Raises:
        RuntimeError: ``loop`` is closed (``coro`` is closed, never run).
    """
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def settle(task: asyncio.Task[T]) -> None:
        if task.cancelled():
            future.cancel()
            return
        error = task.exception()  # taken here, whoever hears of it
        try:
            if error is None:
                future.set_result(task.result())
            else:
                future.set_exception(error)
        except concurrent.futures.InvalidStateError:  # cancelled: nobody waits
            if error is not None:
                _late(what, error, log)

    # whichever of `start` (in the loop's thread) and the future's cancellation (in the
    # thread cancelling it) takes it first owns ``coro``: the other leaves it alone
    owner = threading.Lock()

    def start() -> None:
        if not owner.acquire(blocking=False):
            return  # the future was cancelled before this ran, and ``coro`` closed
        if future.cancelled():  # just now: its callback has not run yet
            coro.close()
            return
        task = loop.create_task(coro)
        task.add_done_callback(settle)
        future.add_done_callback(lambda _: _cancel_soon(loop, task))

    def withdrawn(_: concurrent.futures.Future[T]) -> None:
        if future.cancelled() and owner.acquire(blocking=False):
            coro.close()  # not started: `start`, if it ever runs, will not

    future.add_done_callback(withdrawn)
    try:
        loop.call_soon_threadsafe(start)
    except RuntimeError:
        coro.close()
        raise
    except BaseException:
        # interrupted (a Ctrl-C) while scheduling: ``start`` may not be scheduled, or be
        # and even be running (the wake-up's send lets the loop's thread in).  Nobody
        # will wait for the future, so the call is cancelled wherever it got to (``coro``
        # closed if ``start`` has not taken it)
        future.cancel()
        raise
    return future


def _cancel_soon(loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any]) -> None:
    # from the thread that cancelled the future (the task's own, or its caller's)
    if task.done() or loop.is_closed():
        return
    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(task.cancel)


def _late(what: str, error: BaseException, log: logging.Logger) -> None:
    """Log ``error``, which ``what`` ended with once its caller no longer waited for it."""
    log.error("%s failed after its caller stopped waiting for it", what, exc_info=error)


async def close_at_home(
    loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[None]]
) -> bool:
    """
    Run ``close()`` in ``loop`` (still running, in another thread) and wait for it, at
    most `HOME_CLOSE_SECONDS`: True once it is done, the error it raised raised here.
    False when ``loop`` no longer runs (or stops meanwhile: that is seen within
    `_STOP_CHECK` seconds), or did not finish the close in that time: the close is
    then cancelled (never started, if it had not), and an error it still ends with is
    logged (as is one it ends with while the caller is cancelled).
    """
    if loop.is_closed() or not loop.is_running():
        return False
    what = f"{getattr(close, '__qualname__', 'close')}() in its own event loop"

    async def run() -> None:
        await close()

    try:
        future = submit(loop, run(), what, logger)
    except RuntimeError:  # closed meanwhile
        return False
    waited = asyncio.wrap_future(future)
    waited.add_done_callback(_taken)  # the outcome is read from ``future``
    try:
        await _while_running(loop, waited)
    except BaseException:  # cancelled: a close that is over is not to be heard here
        if not future.cancel() and (error := future.exception()) is not None:
            _late(what, error, logger)
        raise
    if future.cancel():  # not over in time: the close is cancelled
        return False
    future.result()  # over: its error raised here
    return True


async def _while_running(loop: asyncio.AbstractEventLoop, waited: asyncio.Future[None]) -> None:
    """Wait for ``waited`` at most `HOME_CLOSE_SECONDS`, and only while ``loop`` runs."""
    end = time.monotonic() + HOME_CLOSE_SECONDS
    while not waited.done() and loop.is_running():
        left = end - time.monotonic()
        if left <= 0:
            return
        # asyncio tells nobody that a loop stopped: looked at every `_STOP_CHECK` s
        await asyncio.wait({waited}, timeout=min(left, _STOP_CHECK))


def _taken(waited: asyncio.Future[None]) -> None:
    if not waited.cancelled():
        waited.exception()


HOME_CLOSE_SECONDS = 10.0
"""The longest a close waits for the event loop an object belongs to (another thread's)."""

_STOP_CHECK = 0.1
"""How often a close waiting for another thread's loop looks whether that loop stopped."""


def dropped(what: str, lost: str, home: asyncio.AbstractEventLoop) -> None:
    """
    The one warning of a close from another event loop (``home``, the one ``what`` was
    opened in) that `close_at_home` could not do there: what could not be closed.
    """
    why = (
        f"which did not finish closing it within {HOME_CLOSE_SECONDS:g} s"
        if home.is_running() and not home.is_closed()
        else "which no longer runs"
    )
    warnings.warn(
        f"{what} was closed from another event loop than the one it was opened in, {why}: "
        f"{lost} bound to that loop could not be closed and were dropped; close it in the "
        "event loop it was opened in",
        ResourceWarning,
        stacklevel=3,
    )
