"""
`ChangeFeed`: a shared store's announcements that breaker keys changed.

A breaker's local view answers admissions for ``local_view_ttl`` seconds after the
store's answer it came from; past that, a rarely used key pays a store round trip per
call.  A store that can announce changes (Redis pub/sub, PostgreSQL ``NOTIFY``) offers
a `ChangeFeed`, and a view then stays usable for as long as the feed proves that no
change of its key went unannounced, without weakening the staleness bound:

* the store's watcher (a coroutine the feed runs in a task while anyone listens) calls
  `announce` for every write that gives a key a new generation (every transition; a key
  created or recreated at generation 0 included);
* it calls `synced` with a ``time.monotonic()`` instant ``t`` once it has proof that
  every change the store made before ``t`` has reached it (the answer to a PING sent at
  ``t`` on the subscription's own connection arrives after every message published
  before it);
* it calls `begin` when a subscription starts: announcements before it may have been
  missed, so listeners stop trusting what they have not fetched since.

A view whose key has no announcement of another generation since it was fetched is then
current as of the last sync: a change the watcher has not announced yet was made after
``synced_at``, so serving the view until ``synced_at + local_view_ttl`` keeps every
change visible within ``local_view_ttl`` seconds, as the TTL alone does.  When the
subscription is down, ``synced_at`` stops moving and views expire by their TTL again.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Protocol

logger = logging.getLogger("empathy_models.breaker")

RETRY_MIN = 0.1
RETRY_MAX = 5.0
"""Seconds between attempts to subscribe again after a failure (doubling up to this)."""


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
            `announce` and `synced` (at least every `interval` seconds) until the
            subscription fails, when it raises (or returns).  The feed runs it in a task
            while it has listeners, subscribing again after a failure (0.1 s, doubling
            up to 5 s).
        name: the store, for logs (no secrets).
    """

    def __init__(self, watch: Callable[[ChangeFeed], Awaitable[None]], name: str) -> None:
        self._watch = watch
        self._name = name
        self._listeners: dict[FeedListener, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._failing = False
        self.synced_at = -math.inf
        """``time.monotonic()`` of the last sync (`synced`); ``-inf`` while not subscribed."""

    def __repr__(self) -> str:
        return f"ChangeFeed({self._name}, listeners={len(self._listeners)})"

    @property
    def interval(self) -> float:
        """Seconds between syncs: a quarter of the listeners' shortest ``ttl``, 10 ms-1 s."""
        ttl = min(self._listeners.values(), default=1.0)
        return min(max(ttl / 4, 0.01), 1.0)

    @property
    def listening(self) -> bool:
        """Whether the watcher runs (someone listens and the store is open)."""
        return self._task is not None

    # ------------------------------------------------------------------ listeners

    def listen(self, listener: FeedListener, ttl: float) -> None:
        """Tell ``listener`` of every change from now on; start the watcher if needed."""
        if self._closed:
            return
        self._listeners[listener] = ttl
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"{self!r} watcher"
            )

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
        task, self._task = self._task, None
        self.synced_at = -math.inf
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    # ------------------------------------------------------------------ the watcher's side

    def begin(self) -> None:
        """A subscription started: listeners forget what they cannot have had announced."""
        self.synced_at = -math.inf
        for listener in list(self._listeners):
            listener.restarted()

    def announce(self, key: str, generation: int) -> None:
        """``key`` now has ``generation`` in the store."""
        for listener in list(self._listeners):
            listener.announced(key, generation)

    def synced(self, at: float) -> None:
        """Every change made before ``at`` (``time.monotonic()``) has been announced."""
        self.synced_at = at
        if self._failing:
            self._failing = False
            logger.info("circuit breaker: %s announces changes again", self._name)

    async def _run(self) -> None:
        delay = RETRY_MIN
        while True:
            error = "the subscription ended"
            try:
                await self._watch(self)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: subscribe again
                error = f"{type(exc).__name__}: {exc}"
            proved = self.synced_at > -math.inf
            self.synced_at = -math.inf
            for listener in list(self._listeners):
                listener.restarted()
            if not self._failing:
                self._failing = True
                logger.warning(
                    "circuit breaker: %s announces no changes (%s); local views expire "
                    "after local_view_ttl until it does",
                    self._name,
                    error,
                )
            delay = RETRY_MIN if proved else min(delay * 2, RETRY_MAX)
            await asyncio.sleep(delay)
