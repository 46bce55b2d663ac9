"""
Objects bound to the event loop they were opened in: the check, and closing from another.

An object opened in one event loop (its tasks, locks, sockets) can only be used in that
loop.  `elsewhere` is the check; `close_at_home` runs a close in the loop it belongs to
when that loop still runs (in another thread); otherwise what is bound to it is dropped
and `dropped` says so in one warning.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable

from .exceptions import NotOpenError

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


async def close_at_home(
    loop: asyncio.AbstractEventLoop, close: Callable[[], Awaitable[None]]
) -> bool:
    """
    Run ``close()`` in ``loop`` (still running, in another thread) and wait for it, at
    most `HOME_CLOSE_SECONDS`; False when ``loop`` no longer runs, or did not finish
    the close in that time (a loop stopped meanwhile never will).
    """
    if loop.is_closed() or not loop.is_running():
        return False

    async def run() -> None:
        await close()

    try:
        future = asyncio.run_coroutine_threadsafe(run(), loop)
    except RuntimeError:  # closed meanwhile
        return False
    try:
        await asyncio.wait_for(asyncio.wrap_future(future), HOME_CLOSE_SECONDS)
    except TimeoutError:
        future.cancel()
        return False
    return True


HOME_CLOSE_SECONDS = 10.0
"""The longest a close waits for the event loop an object belongs to (another thread's)."""


def dropped(what: str, lost: str) -> None:
    """The one warning of a close from another event loop: what could not be closed."""
    warnings.warn(
        f"{what} was closed from another event loop than the one it was opened in, which "
        f"no longer runs: {lost} bound to that loop could not be closed and were dropped; "
        "close it in the event loop it was opened in",
        ResourceWarning,
        stacklevel=3,
    )
