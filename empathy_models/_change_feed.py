"""
`ChangeFeed`: a shared store's announcements that breaker keys changed.

A breaker's local view answers admissions for ``local_view_ttl`` seconds after the
store's answer it came from; past that, a rarely used key pays a store round trip per
call, and the exact mode (``local_view_ttl=0``) pays one per call always.  A store that
can announce changes (Redis pub/sub, PostgreSQL ``NOTIFY``) offers a `ChangeFeed`,
which makes both cheaper without weakening what they promise:

* the store's watcher (a coroutine the feed runs in a task while anyone listens) calls
  `announce` for every write that gives a key a new generation (every transition; a key
  created or recreated at generation 0 included);
* it calls `synced` with a ``time.monotonic()`` instant ``t`` once it has proof that
  every change the store made before ``t`` has reached it (the answer to a PING sent at
  ``t`` on the subscription's own connection arrives after every message published
  before it), at least every `interval` seconds and as soon as it can after its ``ping``
  callable is called;
* it calls `begin` when a subscription starts (with that ``ping``): announcements
  before it may have been missed, so listeners stop trusting what they have not
  fetched since.  A watcher whose subscription can answer a round trip from any task
  (PostgreSQL: a ``SELECT 1`` on the listening session) also hands `begin` a ``direct``
  coroutine function: `sync` then awaits the round trip itself rather than waking the
  watcher to send it and being woken by it (two task switches and their timers: a
  quarter to a third of a sync's time).

A view whose key has no announcement of another generation since it was fetched is then
current as of the last sync: a change the watcher has not announced yet was made after
``synced_at``.  So the view may serve until ``synced_at + local_view_ttl`` (every
change still visible within ``local_view_ttl`` seconds, as with the TTL alone), and in
the exact mode an admission that waits for a sync point after it began (`sync`) reads
the store's state as of a moment within the admission, as a store round trip would:
the PING is that round trip, and a cheap one.  When the subscription is down,
``synced_at`` stops moving and `sync` answers false: views expire by their TTL and the
exact mode asks the store, as without a feed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from ._propagation import background

logger = logging.getLogger("empathy_models.breaker")

RETRY_MIN = 0.1
RETRY_MAX = 5.0
"""Seconds between attempts to subscribe again after a failure (doubling up to this)."""

SYNC_TIMEOUT = 2.0
"""Seconds `sync` waits for a sync point before it gives up (the caller asks the store)."""

STOP_TIMEOUT = 5.0
"""Seconds stopping the watcher waits for it to end before leaving it to end on its own."""

RECANCEL_INTERVAL = 1.0
"""Seconds between cancellations of a watcher that has not ended (a store's client may
swallow one)."""


class FeedListener(Protocol):
    """What a feed tells its listeners (a breaker's local view)."""

    def announced(self, key: str, generation: int) -> None:
        """``key`` now has ``generation`` in the store."""

    def restarted(self) -> None:
        """A new subscription: changes made before it may never have been announced."""


class ChangeFeed:
    """
    One store's announcements of changed keys, shared by every breaker on the store.

    Args:
        watch: the store's watcher: ``await watch(feed)`` subscribes, calls `begin`, then
            `announce` and `synced` until the subscription fails, when it raises (or
            returns).  The feed runs it in a task while it has listeners, subscribing
            again after a failure (0.1 s, doubling up to 5 s).  The last listener gone
            (or `aclose`) cancels that task and waits for it for at most `STOP_TIMEOUT`
            seconds, cancelling it again every `RECANCEL_INTERVAL` seconds: a watcher
            whose client swallows a cancellation (returns or raises something else) ends
            the task all the same, and one that never ends is left running, with a
            warning, rather than holding the breaker's ``aclose``.
        name: the store, for logs (no secrets).
    """

    def __init__(self, watch: Callable[[ChangeFeed], Awaitable[None]], name: str) -> None:
        self._watch = watch
        self._name = name
        self._listeners: dict[FeedListener, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self._ping: Callable[[], None] | None = None
        self._direct: Callable[[], Awaitable[bool]] | None = None
        self._waiters: collections.deque[tuple[float, asyncio.Future[bool]]] = collections.deque()
        self.synced_at = -math.inf
        """``time.monotonic()`` of the last sync (`synced`); ``-inf`` while not subscribed."""

    def __repr__(self) -> str:
        return f"ChangeFeed({self._name}, listeners={len(self._listeners)})"

    @property
    def interval(self) -> float:
        """
        Seconds between the watcher's own syncs: a quarter of the shortest ``ttl`` of
        the listeners that have one (10 ms-1 s; 1 s when all are exact: they ask).
        """
        ttl = min((t for t in self._listeners.values() if t > 0), default=4.0)
        return min(max(ttl / 4, 0.01), 1.0)

    @property
    def listening(self) -> bool:
        """Whether the watcher runs (someone listens and the store is open)."""
        return self._task is not None

    # ------------------------------------------------------------------ listeners

    def listen(self, listener: FeedListener, ttl: float) -> None:
        """Tell ``listener`` (whose views live ``ttl`` seconds) of every change from now
        on; start the watcher if needed."""
        if self._closed:
            return
        self._listeners[listener] = ttl
        if self._task is None:
            self._task = background(self._run(), f"{self!r} watcher")

    async def unlisten(self, listener: FeedListener) -> None:
        """Stop telling ``listener``; the last one gone stops the watcher."""
        self._listeners.pop(listener, None)
        if not self._listeners:
            await self._stop()

    async def aclose(self) -> None:
        """Stop the watcher for good (the store is closing)."""
        self._closed = True
        self._listeners.clear()
        await self._stop()

    async def _stop(self) -> None:
        """
        Stop the watcher's task (`_run` ends at its next turn once it is no longer
        ``_task``): cancel it and wait for it, bounded (see the class), also while the
        caller is being cancelled, whose cancellation is raised afterwards.
        """
        task, self._task = self._task, None
        self._end()
        if task is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + STOP_TIMEOUT
        recancel = now
        interrupted: asyncio.CancelledError | None = None
        while not task.done():
            now = loop.time()
            if now >= deadline:
                logger.warning(
                    "circuit breaker: %s's watcher did not end within %g s of being "
                    "cancelled; it is left to end on its own",
                    self._name,
                    STOP_TIMEOUT,
                )
                break
            if now >= recancel:  # again after the first time: it may have been swallowed
                task.cancel()
                recancel = now + RECANCEL_INTERVAL
            try:
                await asyncio.wait({task}, timeout=min(deadline, recancel) - now)
            except asyncio.CancelledError as exc:
                interrupted = exc  # the caller's: wait on (bounded), raise it after
        if interrupted is not None:
            raise interrupted

    async def sync(self) -> bool:
        """
        Wait for a sync point after now: true once every change the store made before
        this call has been announced (and handed to the listeners); false, at once,
        when the feed is not subscribed, or after `SYNC_TIMEOUT` seconds without one.
        """
        direct = self._direct
        if direct is not None:
            return await direct()
        ping = self._ping
        if ping is None:
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._waiters.append((time.monotonic(), future))
        ping()
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                return await future
        except TimeoutError:
            return False

    # ------------------------------------------------------------------ the watcher's side

    def begin(
        self, ping: Callable[[], None], direct: Callable[[], Awaitable[bool]] | None = None
    ) -> None:
        """
        A subscription started: listeners forget what they cannot have had announced.
        ``ping()`` asks the watcher for a sync point as soon as it can (it must not
        block); `sync` calls it.  ``direct`` (optional): ``await direct()`` reaches a
        sync point after the call began, calling `synced` itself, and answers whether
        it did (false: the subscription failed); `sync` then awaits it instead.
        """
        self._end()
        self._ping = ping
        self._direct = direct
        for listener in list(self._listeners):
            listener.restarted()

    def announce(self, key: str, generation: int) -> None:
        """``key`` now has ``generation`` in the store."""
        for listener in list(self._listeners):
            listener.announced(key, generation)

    def synced(self, at: float) -> None:
        """Every change made before ``at`` (``time.monotonic()``) has been announced."""
        self.synced_at = at
        waiters = self._waiters
        while waiters and waiters[0][0] <= at:
            future = waiters.popleft()[1]
            if not future.done():
                future.set_result(True)
        if self._failing:
            self._failing = False
            logger.info("circuit breaker: %s announces changes", self._name)

    def _end(self) -> None:
        """No subscription (any more): nothing is confirmed, every `sync` answers false."""
        self.synced_at = -math.inf
        self._ping = None
        self._direct = None
        waiters, self._waiters = self._waiters, collections.deque()
        for _, future in waiters:
            if not future.done():
                future.set_result(False)

    async def _run(self) -> None:
        me = asyncio.current_task()
        delay = RETRY_MIN
        while self._task is me:
            error = "the subscription ended"
            try:
                await self._watch(self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: subscribe again
                error = f"{type(exc).__name__}: {exc}"
            if self._task is not me or (me is not None and me.cancelling()):
                # stopped: the watcher's client swallowed the cancellation (redis-py
                # while it connects; asyncio.wait_for on Python 3.11 when the inner call
                # has just ended) and returned or raised something else
                return
            proved = self.synced_at > -math.inf
            self._end()
            for listener in list(self._listeners):
                listener.restarted()
            if not self._failing:
                self._failing = True
                logger.warning(
                    "circuit breaker: %s announces no changes (%s); local views expire "
                    "after local_view_ttl and the exact mode asks the store until it does",
                    self._name,
                    error,
                )
            delay = RETRY_MIN if proved else min(delay * 2, RETRY_MAX)
            await asyncio.sleep(delay)
