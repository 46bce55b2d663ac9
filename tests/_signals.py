"""What a child process inherits of this one's SIGINT handling, for tests that send Ctrl-C."""

from __future__ import annotations

import signal


def sigint_state() -> str:
    """
    This process's SIGINT handler and whether the calling thread blocks SIGINT, said
    when not the defaults: a child process inherits an ignored SIGINT and the blocked
    mask across ``exec``, and then never sees a Ctrl-C.  Put in the message of a test
    whose child did not react to one, it tells the test's own process apart from the
    code under test.
    """
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is signal.default_int_handler and not blocked:
        return "this process handles SIGINT as Python's default"
    return f"this process's SIGINT handler: {handler!r}; blocked in this thread: {blocked}"
